"""Long runs and reproducibility: --output as the run goes, --resume, identical reruns.

The kill test runs real ``lmeval ppl`` subprocesses: one is killed with SIGKILL once
documents.jsonl has rows, then resumed, and compared with an uninterrupted run. The
other tests call :func:`lmeval.run.run_perplexity` in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from tiny import GGUF_VOCAB_SIZE, make_tiny_llama, make_tokenizer, save_model_dir, write_tiny_gguf

from lmeval import perplexity, results
from lmeval.config import RunConfig
from lmeval.errors import ConfigError
from lmeval.results import OutputDirectory, read_rows, write_json_atomic
from lmeval.run import run_identity, run_perplexity

WORDS = [f"w{i}" for i in range(20)]
NUM_DOCUMENTS = 40
# Enough documents that scoring takes a few seconds on one thread, while the first
# rows arrive after one group of WINDOWS_PER_GROUP documents (a fraction of a second).
KILL_DOCUMENTS = 600
KILL_AFTER_ROWS = 3
TIMING_KEYS = {"load_seconds", "scoring_seconds", "wall_seconds", "tokens_per_second"}


def write_lines(path: Path, count: int, seed: int) -> Path:
    """Write ``count`` documents of 5 to 60 random words, one per line."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-model")
    model = make_tiny_llama(3 + len(WORDS), max_positions=64, seed=0)
    return save_model_dir(root / "model", model, make_tokenizer(WORDS))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_lines(tmp_path_factory.mktemp("resume-data") / "docs.txt", NUM_DOCUMENTS, 1)


@pytest.fixture
def config(model_dir, corpus, tmp_path) -> RunConfig:
    return RunConfig(
        model=str(model_dir),
        data=str(corpus),
        sample_by="line",
        window_size=16,
        threads=1,
        progress=False,
        output=str(tmp_path / "run"),
    )


def rows_of(directory: str | Path) -> list[dict]:
    return read_rows(Path(directory) / results.DOCUMENTS_FILE)


def cut_rows(directory: str | Path, keep: int, partial: bool = True) -> None:
    """Leave the first ``keep`` rows (and part of the next one), as a killed run does."""
    path = Path(directory) / results.DOCUMENTS_FILE
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    tail = lines[keep][: len(lines[keep]) // 2] if partial else ""
    path.write_text("".join(lines[:keep]) + tail, encoding="utf-8")
    (Path(directory) / results.RESULTS_FILE).unlink()


# --- a killed run, resumed -----------------------------------------------------


def lmeval_command(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmeval",
        "ppl",
        "--model",
        str(model),
        "--data",
        str(data),
        "--sample-by",
        "line",
        "--window-size",
        "32",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--output",
        str(output),
        "-q",
        "--no-progress",
        *extra,
    ]


def wait_for_rows(path: Path, count: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(read_rows(path)) >= count:
            return
        time.sleep(0.02)


def comparable(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING_KEYS}


def test_killed_run_resumes_identically(model_dir, tmp_path):
    data = write_lines(tmp_path / "many.txt", KILL_DOCUMENTS, seed=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", LMEVAL_CACHE_DIR=str(tmp_path / "cache"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    options = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    reference = subprocess.Popen(lmeval_command(model_dir, data, full), **options)
    victim = subprocess.Popen(lmeval_command(model_dir, data, killed), **options)

    wait_for_rows(killed / results.DOCUMENTS_FILE, KILL_AFTER_ROWS, victim, timeout=240)
    still_running = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    rows_at_kill = len(rows_of(killed))
    resumed = subprocess.run(
        lmeval_command(model_dir, data, killed, "--resume"), **options, timeout=600
    )
    _, reference_stderr = reference.communicate(timeout=600)

    assert still_running, "the run finished before it was killed; use more documents"
    assert KILL_AFTER_ROWS <= rows_at_kill < KILL_DOCUMENTS
    assert resumed.returncode == 0, resumed.stderr
    assert reference.returncode == 0, reference_stderr
    full_results = json.loads((full / results.RESULTS_FILE).read_text())
    resumed_results = json.loads((killed / results.RESULTS_FILE).read_text())
    assert resumed_results["metrics"] == full_results["metrics"]
    assert resumed_results["timing"]["resumed_documents"] == rows_at_kill
    assert [comparable(r) for r in rows_of(killed)] == [comparable(r) for r in rows_of(full)]


# --- resume rules ---------------------------------------------------------------


def test_resume_rejects_other_configuration(config):
    run_perplexity(config)
    other = replace(config, window_size=8, resume=True)
    with pytest.raises(
        ConfigError, match=r"different configuration \(protocol\.window_size: 16 -> 8"
    ):
        run_perplexity(other)


def test_finished_run_without_resume_rejected(config):
    run_perplexity(config)
    with pytest.raises(ConfigError, match="already holds results of this run; pass --resume"):
        run_perplexity(config)


def test_resume_of_finished_run_scores_nothing(config):
    first = run_perplexity(config)
    again = run_perplexity(replace(config, resume=True))
    assert again["metrics"] == first["metrics"]
    assert again["timing"]["tokens_scored"] == 0
    assert again["timing"]["resumed_documents"] == NUM_DOCUMENTS


@pytest.mark.parametrize("partial", [True, False])
def test_resume_after_cut_rows(config, partial):
    first = run_perplexity(config)
    expected_rows = rows_of(config.output)
    cut_rows(config.output, keep=7, partial=partial)
    resumed = run_perplexity(replace(config, resume=True))
    assert resumed["metrics"] == first["metrics"]
    assert resumed["timing"]["resumed_documents"] == 7
    assert rows_of(config.output) == expected_rows
    # The per-document summary covers the resumed documents too.
    assert resumed["diagnostics"]["documents"] == first["diagnostics"]["documents"]


@pytest.mark.parametrize("name", [results.DOCUMENTS_FILE, results.RESULTS_FILE])
@pytest.mark.parametrize("resume", [False, True])
def test_outputs_without_config_rejected(config, name, resume):
    Path(config.output).mkdir()
    (Path(config.output) / name).write_text("{}\n")
    with pytest.raises(ConfigError, match=f"contains {name} but no config.json"):
        run_perplexity(replace(config, resume=resume))


def test_resume_across_gguf_cache_dirs(tmp_path):
    # A GGUF file converted into another cache directory is the same model.
    model = make_tiny_llama(GGUF_VOCAB_SIZE, max_positions=64, seed=0)
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    data = tmp_path / "letters.txt"
    data.write_text("the cat sat on a mat\nand the dog ran far away\nthen it came back\n")
    config = RunConfig(
        model=str(gguf_path),
        data=str(data),
        sample_by="line",
        threads=1,
        progress=False,
        output=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache-a"),
    )
    first = run_perplexity(config)
    cut_rows(config.output, keep=1)
    resumed = run_perplexity(replace(config, cache_dir=str(tmp_path / "cache-b"), resume=True))
    assert resumed["model"]["cache_path"] != first["model"]["cache_path"]
    assert resumed["metrics"] == first["metrics"]


def test_resume_with_other_auto_batch_size(config, monkeypatch):
    # --batch-size auto may choose another size after a restart (free memory varies).
    config = replace(config, batch_size="auto")
    monkeypatch.setattr(perplexity, "auto_batch_size", lambda model, window: 2)
    first = run_perplexity(config)
    cut_rows(config.output, keep=5)
    monkeypatch.setattr(perplexity, "auto_batch_size", lambda model, window: 3)
    resumed = run_perplexity(replace(config, resume=True))
    assert resumed["protocol"]["batch_size"] == 3
    assert resumed["metrics"]["mean_nll"] == pytest.approx(first["metrics"]["mean_nll"], rel=1e-6)


# --- files written as the run goes ----------------------------------------------


def test_row_readable_once_appended(tmp_path):
    output = OutputDirectory(tmp_path / "run", {"command": "ppl"}, resume=False)
    output.append({"index": 0, "id": "0"})
    assert read_rows(tmp_path / "run" / results.DOCUMENTS_FILE) == [{"index": 0, "id": "0"}]
    output.close()


def test_results_json_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"version": 1})

    def fail_midway(value, file, **options):
        file.write('{"version": ')
        raise OSError("disk full")

    monkeypatch.setattr(results.json, "dump", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# --- determinism and provenance -------------------------------------------------


def test_two_runs_give_identical_results(config, tmp_path):
    first = run_perplexity(config)
    second = run_perplexity(replace(config, output=str(tmp_path / "again")))
    assert second["metrics"] == first["metrics"]
    assert rows_of(tmp_path / "again") == rows_of(config.output)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_results_record_provenance(config, model_dir, corpus):
    record = run_perplexity(config)
    assert record["config"]["model"] == str(model_dir)
    assert record["config"]["window_size"] == 16
    assert record["model"]["sha256"] == sha256_of(model_dir / "model.safetensors")
    assert record["model"]["model_class"] == "LlamaForCausalLM"
    assert record["data"]["source"]["files"][0]["sha256"] == sha256_of(corpus)
    assert record["data"]["documents_sha256"]
    assert record["protocol"]["name"] == "rolling"
    assert record["protocol"]["window_size"] == 16
    assert record["protocol"]["prefix_token"] == "<s>"
    assert record["protocol"]["log_softmax_dtype"] == "float32"
    assert all(record["versions"][name] for name in ("lmeval", "torch", "transformers"))
    assert record["environment"]["torch_threads"] == 1
    assert json.loads((Path(config.output) / results.RESULTS_FILE).read_text()) == record


GGUF_MODEL = {
    "spec": "m",
    "source": "gguf",
    "path": "/models/m.gguf",
    "sha256": "ab",
    "cache_path": "/cache-a/gguf/ab",
}
BUILTIN_MODEL = GGUF_MODEL | {"source": "builtin"}


@pytest.mark.parametrize(
    ("before", "after", "same"),
    [
        (GGUF_MODEL, GGUF_MODEL | {"cache_path": "/cache-b/gguf/ab"}, True),
        (BUILTIN_MODEL, BUILTIN_MODEL | {"path": "/cache-b/m.gguf"}, True),
        (GGUF_MODEL, GGUF_MODEL | {"path": "/elsewhere/m.gguf"}, False),
        (GGUF_MODEL, GGUF_MODEL | {"sha256": "cd"}, False),
    ],
    ids=["cache-path", "builtin-path", "gguf-path", "sha256"],
)
def test_fingerprint_of_model_identity(before, after, same):
    config = RunConfig(model="m")
    first = run_identity(config, before, {}, {"batch_size": 1})
    second = run_identity(config, after, {}, {"batch_size": 1})
    assert (results.fingerprint(first) == results.fingerprint(second)) is same


def test_fingerprint_keeps_requested_batch_size():
    config = RunConfig(model="m", batch_size="auto")
    first = run_identity(config, GGUF_MODEL, {}, {"batch_size": 2})
    second = run_identity(config, GGUF_MODEL, {}, {"batch_size": 5})
    assert results.fingerprint(first) == results.fingerprint(second)
