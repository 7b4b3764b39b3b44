"""lmeval.drift: checkpoint steps and order, and ``lmeval drift`` on a short fine-tune."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_llama, make_tokenizer, save_model_dir
from transformers import Trainer, TrainingArguments

from lmeval.cli import main
from lmeval.drift import checkpoint_step, order_checkpoints

WORDS = [f"w{i}" for i in range(20)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One thread is faster for tiny models, much more so on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, count: int = 48, length: int = 24) -> None:
        generator = torch.Generator().manual_seed(0)
        self.blocks = [
            torch.randint(3, vocab_size // 2, (length,), generator=generator) for _ in range(count)
        ]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory) -> Path:
    """Fine-tune a tiny model for 6 steps, saving checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("fine-tune")
    tokenizer = make_tokenizer(WORDS, pad="<pad>")
    model = make_tiny_llama(len(tokenizer), seed=0)
    save_model_dir(root / "base", model, tokenizer)
    arguments = TrainingArguments(
        output_dir=str(root / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=TokenBlocks(len(tokenizer)),
        processing_class=tokenizer,
    )
    trainer.train()
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS[:8], size=n))} for n in (40, 30)]
    (root / "held-out.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_checkpoint_step_from_trainer_state(tmp_path):
    checkpoint = tmp_path / "final"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1234}))
    assert checkpoint_step(checkpoint) == 1234


def test_checkpoint_step_from_name(tmp_path):
    assert checkpoint_step(tmp_path / "checkpoint-500") == 500
    assert checkpoint_step(tmp_path / "epoch-3") is None


def test_checkpoints_sorted_by_step_or_kept_in_order(tmp_path):
    names = ["checkpoint-30", "checkpoint-4", "checkpoint-100"]
    ordered = order_checkpoints([str(tmp_path / name) for name in names])
    assert [checkpoint.step for checkpoint in ordered] == [4, 30, 100]
    mixed = order_checkpoints([str(tmp_path / "late"), str(tmp_path / "checkpoint-1")])
    assert [checkpoint.name for checkpoint in mixed] == ["late", "checkpoint-1"]


def test_drift_over_checkpoints(fine_tune, tmp_path):
    output = tmp_path / "drift"
    run = fine_tune / "run"
    checkpoints = [str(run / f"checkpoint-{step}") for step in (6, 2, 4)]
    status = main(
        ["drift", "--reference", str(fine_tune / "base"), *checkpoints,
         "--data", str(fine_tune / "held-out.jsonl"), "--window-size", "16",
         "--output", str(output), "--no-progress", "--threads", "1", "-q"]
    )  # fmt: skip
    assert status == 0

    summary = json.loads((output / "drift.json").read_text())
    assert summary["x_axis"] == "step"
    assert [row["step"] for row in summary["rows"]] == [2, 4, 6]
    values = [row["kl_ref_model"] for row in summary["rows"]]
    assert 0 < values[0] < values[1] < values[2], values
    assert all(row["estimate"] == "exact" for row in summary["rows"])

    table = (output / "drift.md").read_text()
    assert table.startswith("| checkpoint | step | KL(model‖ref)")
    assert "| checkpoint-4 | 4 |" in table
    with open(output / "drift.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    assert (output / "drift.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (output / "reference-cache.safetensors").is_file()
    for index, step in enumerate((2, 4, 6)):
        results = output / "checkpoints" / f"{index:02d}-checkpoint-{step}" / "results.json"
        assert json.loads(results.read_text())["metrics"]["kl_ref_model"]["mean"] == values[index]


def test_drift_reuses_given_compact_cache(fine_tune, tmp_path):
    cache = tmp_path / "base.safetensors"
    common = ["--data", str(fine_tune / "held-out.jsonl"), "--window-size", "16",
              "--no-progress", "--threads", "1", "-q"]  # fmt: skip
    first = str(fine_tune / "run" / "checkpoint-2")
    assert main(["drift", "--reference", str(fine_tune / "base"), "--reference-cache",
                 str(cache), "--cache-format", "compact", "--cache-top-k", "5", first,
                 "--output", str(tmp_path / "one"), *common]) == 0  # fmt: skip
    written = cache.stat().st_mtime_ns
    assert main(["drift", "--reference-cache", str(cache), first,
                 "--output", str(tmp_path / "two"), *common]) == 0  # fmt: skip
    assert cache.stat().st_mtime_ns == written
    one = json.loads((tmp_path / "one" / "drift.json").read_text())["rows"][0]
    two = json.loads((tmp_path / "two" / "drift.json").read_text())["rows"][0]
    assert one["kl_ref_model"] == two["kl_ref_model"]
    assert one["estimate"] == "lower bound"


def test_drift_rejects_model_option(fine_tune, tmp_path, capsys):
    status = main(["drift", "--model", "x", str(fine_tune / "base"), "--output", str(tmp_path)])
    assert status == 2
    assert "drift takes the checkpoints as arguments, not --model" in capsys.readouterr().err


def test_drift_output_under_file_is_one_line(fine_tune, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory\n")
    output = tmp_path / "a-file" / "drift"
    args = ["drift", "--reference", str(fine_tune / "base"), str(fine_tune / "base")]
    status = main([*args, "--data", str(tmp_path / "a-file"), "--output", str(output)])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith("lmeval: error: cannot write to --output ")
