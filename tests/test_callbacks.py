"""lmeval.callbacks.KLDriftCallback in short fine-tunes of a tiny model with Trainer."""

import copy
import subprocess
import sys

import pytest
import torch
from tiny import make_tiny_llama, make_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from lmeval.callbacks import KLDriftCallback
from lmeval.errors import ConfigError

WORDS = [f"w{i}" for i in range(20)]
HELD_OUT = [" ".join(f"w{(7 * i + j) % 12}" for j in range(40)) for i in range(3)]
STEPS = 6


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed random blocks of token ids, a training set the model can fit quickly."""

    def __init__(self, vocab_size: int, count: int = 48, length: int = 24) -> None:
        generator = torch.Generator().manual_seed(0)
        self.blocks = [
            torch.randint(3, vocab_size // 2, (length,), generator=generator) for _ in range(count)
        ]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


class LogRecorder(TrainerCallback):
    """Stands in for a reporting integration: records every ``logs`` given to on_log."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def make_trainer(model, tokenizer, output_dir, recorder) -> Trainer:
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=TokenBlocks(len(tokenizer)),
        processing_class=tokenizer,
        callbacks=[recorder],
    )


def drift_entries(log_history: list[dict], name: str = "drift/kl_model_ref") -> dict[int, float]:
    return {entry["step"]: entry[name] for entry in log_history if name in entry}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One thread is faster for tiny models, much more so on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tokenizer = make_tokenizer(WORDS, pad="<pad>")
    model = make_tiny_llama(len(tokenizer), seed=0)
    recorder = LogRecorder()
    trainer = make_trainer(model, tokenizer, tmp_path_factory.mktemp("train"), recorder)
    callback = KLDriftCallback(trainer, HELD_OUT, reference=copy.deepcopy(model), every_n_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback, recorder


def test_kl_starts_at_zero_and_grows(trained):
    trainer, _callback, _recorder = trained
    for name in ("drift/kl_model_ref", "drift/kl_ref_model"):
        values = drift_entries(trainer.state.log_history, name)
        assert list(values) == [0, 2, 4, 6]
        assert values[0] == 0.0
        steps = sorted(values)
        assert all(values[a] < values[b] for a, b in zip(steps, steps[1:], strict=False)), values


def test_top1_agreement_starts_at_one(trained):
    trainer, _callback, _recorder = trained
    agreement = drift_entries(trainer.state.log_history, "drift/top1_agreement")
    assert agreement[0] == 1.0
    assert agreement[STEPS] < 1.0


def test_training_loss_still_logged(trained):
    trainer, _callback, _recorder = trained
    loss_steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert loss_steps == [2, 4, 6]


def test_values_reach_other_callbacks(trained):
    _trainer, _callback, recorder = trained
    logged = [logs["drift/kl_ref_model"] for logs in recorder.logs if "drift/kl_ref_model" in logs]
    assert len(logged) == 4
    assert logged[0] == 0.0


def test_history_matches_log_history(trained):
    trainer, callback, _recorder = trained
    assert [entry["step"] for entry in callback.history] == [0, 2, 4, 6]
    assert callback.history[-1]["drift/kl_model_ref"] == drift_entries(trainer.state.log_history)[6]


def test_adapters_disabled_reference(tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = make_tokenizer(WORDS, pad="<pad>")
    base = make_tiny_llama(len(tokenizer), seed=0)
    lora = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    model = peft.get_peft_model(base, lora)
    trainer = make_trainer(model, tokenizer, tmp_path, LogRecorder())
    trainer.args.learning_rate = 3e-2
    callback = KLDriftCallback(trainer, HELD_OUT, every_n_steps=3)
    trainer.add_callback(callback)
    trainer.train()
    values = drift_entries(trainer.state.log_history)
    assert list(values) == [0, 3, 6]
    # LoRA starts with B = 0, so the adapted model is exactly the base model.
    assert values[0] == 0.0
    assert 0 < values[3] < values[6]


def test_no_reference_without_adapters_is_rejected(tmp_path):
    tokenizer = make_tokenizer(WORDS, pad="<pad>")
    trainer = make_trainer(make_tiny_llama(len(tokenizer)), tokenizer, tmp_path, LogRecorder())
    with pytest.raises(ConfigError, match="has no PEFT adapters"):
        KLDriftCallback(trainer, HELD_OUT)


def test_empty_texts_are_rejected(tmp_path):
    tokenizer = make_tokenizer(WORDS, pad="<pad>")
    model = make_tiny_llama(len(tokenizer))
    trainer = make_trainer(model, tokenizer, tmp_path, LogRecorder())
    with pytest.raises(ConfigError, match="at least one held-out text"):
        KLDriftCallback(trainer, [], reference=copy.deepcopy(model))


def test_import_lmeval_does_not_import_torch():
    code = "import sys, lmeval; print('torch' in sys.modules, hasattr(lmeval, 'KLDriftCallback'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["False", "True"], result.stderr
