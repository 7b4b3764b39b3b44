"""Fine-tune a tiny Llama for a few steps and log how far it drifts from where it started.

Run from the repository root (no network; 35 seconds with one thread on a busy
two-core machine, and four times as long there with two threads):

    .venv/bin/python examples/finetune_kl_drift.py --output runs/kl-demo --threads 1

The script

1. trains a 512-token byte-level BPE tokenizer and builds a tiny random Llama, or
   loads ``--model DIR`` (a Hugging Face model directory) instead;
2. saves that starting point as ``OUTPUT/base``, the reference;
3. fine-tunes it with ``transformers.Trainer`` on the Python language reference that
   CPython ships in ``pydoc_data``, saving a checkpoint every ``--save-steps`` steps;
4. logs KL(model ‖ base) and KL(base ‖ model) on held-out topics every ``--kl-every``
   steps with ``lmeval.KLDriftCallback``, against a frozen copy of the base, or with
   ``--lora`` against the model itself with its LoRA adapters disabled;
5. prints the logged values, which start at 0, and the ``lmeval drift`` command that
   compares the saved checkpoints with the base.

With ``--lora`` the checkpoints hold only the adapters, which ``lmeval drift`` cannot
load; run without it to get full checkpoints for the drift command.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from lmeval import KLDriftCallback

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/kl-demo", help="directory for all outputs")
    parser.add_argument("--model", help="model directory to fine-tune (default: a tiny Llama)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--save-steps", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--kl-every", type=int, default=10, help="steps between KL logs")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per training example")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: torch's); 1 is fastest for the tiny model",
    )
    parser.add_argument(
        "--report-to", default="none", help="Trainer integrations, e.g. tensorboard (default none)"
    )
    return parser.parse_args()


def python_reference_topics() -> tuple[list[str], list[str]]:
    """Return training and held-out texts: every fifth reference-manual topic is held out."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    held_out = texts[::5]
    training = [text for index, text in enumerate(texts) if index % 5]
    return training, held_out


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def tiny_llama(vocab_size: int, max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


class TokenBlocks(torch.utils.data.Dataset):
    """The training texts as one token stream cut into blocks of ``block_size`` tokens."""

    def __init__(self, tokenizer, texts: list[str], block_size: int) -> None:
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += [*ids, tokenizer.eos_token_id]
        self.blocks = [
            torch.tensor(stream[begin : begin + block_size])
            for begin in range(0, len(stream) - block_size + 1, block_size)
        ]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def load_start(arguments: argparse.Namespace, training: list[str]):
    if arguments.model:
        return (
            AutoModelForCausalLM.from_pretrained(arguments.model),
            AutoTokenizer.from_pretrained(arguments.model),
        )
    tokenizer = train_tokenizer(training)
    return tiny_llama(len(tokenizer), max_positions=4 * arguments.block_size), tokenizer


def with_lora(model):
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, config)


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    output = Path(arguments.output)
    training, held_out = python_reference_topics()
    model, tokenizer = load_start(arguments, training)

    # The starting point is the reference, for the callback and for `lmeval drift`.
    model.save_pretrained(output / "base")
    tokenizer.save_pretrained(output / "base")
    held_out_file = output / "held-out.jsonl"
    held_out_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in held_out))

    reference = None if arguments.lora else copy.deepcopy(model)
    if arguments.lora:
        model = with_lora(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(output),
            max_steps=arguments.steps,
            per_device_train_batch_size=8,
            learning_rate=arguments.learning_rate,
            logging_steps=arguments.kl_every,
            save_strategy="steps",
            save_steps=arguments.save_steps,
            report_to=arguments.report_to,
            use_cpu=True,
            seed=0,
        ),
        train_dataset=TokenBlocks(tokenizer, training, arguments.block_size),
        processing_class=tokenizer,
    )
    callback = KLDriftCallback(
        trainer, held_out[:8], reference=reference, every_n_steps=arguments.kl_every
    )
    trainer.add_callback(callback)
    trainer.train()

    print(f"\n{'step':>5}  {'KL(model||base)':>16}  {'KL(base||model)':>16}  {'top-1 agree':>11}")
    for entry in callback.history:
        print(
            f"{entry['step']:>5}  {entry['drift/kl_model_ref']:>16.5f}  "
            f"{entry['drift/kl_ref_model']:>16.5f}  {entry['drift/top1_agreement']:>11.3f}"
        )
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if checkpoints and not arguments.lora:
        command = [
            ".venv/bin/lmeval", "drift", "--reference", str(output / "base"),
            *map(str, checkpoints), "--data", str(held_out_file), "--output", str(output / "drift"),
        ]  # fmt: skip
        print("\ncompare the checkpoints with the base:\n  " + shlex.join(command))


if __name__ == "__main__":
    main()
