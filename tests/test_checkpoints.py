"""Many checkpoints: ``lmeval ppl`` over several models or a glob, and reruns that skip.

A checkpoint is skipped when its directory contains a results.json written for the same
configuration; the tests check the log line and that the file was not rewritten.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from tiny import make_tiny_llama, make_tokenizer, save_model_dir

from lmeval.checkpoints import SUMMARY_JSON, SUMMARY_TABLE, expand_models
from lmeval.cli import main
from lmeval.errors import ConfigError

WORDS = [f"w{i}" for i in range(12)]
COMMON = ("--window-size", "16", "--threads", "1", "--no-progress")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Three checkpoints of a pretend training run, and a small corpus."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = make_tokenizer(WORDS)
    for seed, step in enumerate((300, 20, 100)):
        model = make_tiny_llama(len(tokenizer), max_positions=32, seed=seed)
        save_model_dir(root / "run" / f"checkpoint-{step}", model, tokenizer)
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=length)) for length in (12, 30, 5)]
    (root / "docs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def ppl(run_dir: Path, output: Path, *models: str) -> int:
    args = ["ppl", "--model", *models, "--data", str(run_dir / "docs.txt")]
    return main([*args, "--sample-by", "line", *COMMON, "--output", str(output)])


def mtimes(output: Path) -> dict[str, int]:
    return {path.parent.name: path.stat().st_mtime_ns for path in output.glob("*/results.json")}


def test_expand_models_sorts_glob_matches(run_dir):
    pattern = str(run_dir / "run" / "checkpoint-*")
    expanded = expand_models([pattern, "smollm2-135m"])
    names = [Path(path).name for path in expanded[:3]]
    assert names == ["checkpoint-100", "checkpoint-20", "checkpoint-300"]
    assert expanded[3] == "smollm2-135m"


def test_expand_models_rejects_empty_glob(tmp_path):
    with pytest.raises(ConfigError, match="matched no paths"):
        expand_models([str(tmp_path / "checkpoint-*")])


def test_checkpoints_scored_in_step_order(run_dir, tmp_path, capsys):
    output = tmp_path / "scores"
    assert ppl(run_dir, output, str(run_dir / "run" / "checkpoint-*"), "-q") == 0
    summary = json.loads((output / SUMMARY_JSON).read_text())
    assert [row["step"] for row in summary["rows"]] == [20, 100, 300]
    assert [row["reused"] for row in summary["rows"]] == [False, False, False]
    for row in summary["rows"]:
        results = json.loads((output / row["checkpoint"] / "results.json").read_text())
        assert results["metrics"]["perplexity"] == row["perplexity"]
    table = (output / SUMMARY_TABLE).read_text()
    assert table.startswith("| checkpoint | step | perplexity")
    assert "| checkpoint-100 | 100 |" in capsys.readouterr().out


def test_rerun_skips_finished_checkpoints(run_dir, tmp_path, caplog):
    output = tmp_path / "scores"
    first = [str(run_dir / "run" / f"checkpoint-{step}") for step in (20, 100)]
    assert ppl(run_dir, output, *first) == 0
    before = mtimes(output)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmeval"):
        assert ppl(run_dir, output, str(run_dir / "run" / "checkpoint-*")) == 0
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2
    assert "checkpoint-20" in skipped[0]
    after = mtimes(output)
    assert {name: after[name] for name in before} == before
    assert set(after) == {"checkpoint-20", "checkpoint-100", "checkpoint-300"}
    summary = json.loads((output / SUMMARY_JSON).read_text())
    assert [row["reused"] for row in summary["rows"]] == [True, True, False]


def test_changed_options_are_not_skipped(run_dir, tmp_path, capsys):
    output = tmp_path / "scores"
    models = [str(run_dir / "run" / f"checkpoint-{step}") for step in (20, 100)]
    assert ppl(run_dir, output, *models) == 0
    capsys.readouterr()
    status = ppl(run_dir, output, *models, "--limit", "2")
    assert status == 2
    error = capsys.readouterr().err
    assert "contains the results of a different configuration" in error
    assert "data.limit" in error


def test_checkpoints_need_output(run_dir, capsys):
    models = [str(run_dir / "run" / f"checkpoint-{step}") for step in (20, 100)]
    status = main(["ppl", "--model", *models, "--data", str(run_dir / "docs.txt"), *COMMON])
    assert status == 2
    assert "2 models given; pass --output DIR" in capsys.readouterr().err


def test_checkpoints_with_one_name_rejected(run_dir, tmp_path, capsys):
    other = tmp_path / "other" / "checkpoint-20"
    other.parent.mkdir()
    other.symlink_to(run_dir / "run" / "checkpoint-100")
    status = ppl(run_dir, tmp_path / "out", str(run_dir / "run" / "checkpoint-20"), str(other))
    assert status == 2
    assert "have the same name 'checkpoint-20'" in capsys.readouterr().err


def test_drift_rerun_skips_finished_checkpoints(run_dir, tmp_path, caplog):
    checkpoints = [str(run_dir / "run" / f"checkpoint-{step}") for step in (100, 300)]
    args = ["drift", "--reference", str(run_dir / "run" / "checkpoint-20"), *checkpoints]
    args += ["--data", str(run_dir / "docs.txt"), "--sample-by", "line", *COMMON]
    args += ["--output", str(tmp_path / "drift")]
    assert main(args) == 0
    results = sorted((tmp_path / "drift" / "checkpoints").glob("*/results.json"))
    before = [path.stat().st_mtime_ns for path in results]
    first = json.loads((tmp_path / "drift" / "drift.json").read_text())["rows"]

    # An unfinished comparison (results.json missing) is compared again.
    results[1].unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmeval"):
        assert main(args) == 0
    messages = [record.getMessage() for record in caplog.records]
    assert sum(message.startswith("skipping") for message in messages) == 1
    assert any(message.startswith("comparing again") for message in messages)
    assert results[0].stat().st_mtime_ns == before[0]
    assert results[1].is_file()
    again = json.loads((tmp_path / "drift" / "drift.json").read_text())["rows"]
    assert again == first
