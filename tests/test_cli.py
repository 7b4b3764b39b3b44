"""The lmeval command line as a user runs it, offline.

Bad input must end with exit status 2 and one line ``lmeval: error: ...`` on stderr
that names the offending value, with no traceback (one appears with ``-v``).
Errors that argparse finds itself print the usage first and then
``lmeval ppl: error: ...``.

Each case of ``ERRORS``, ``ARGPARSE_ERRORS`` and ``RUNS`` is a real ``python -m
lmeval`` subprocess. Most of them import torch and transformers, which costs several
seconds of CPU, so the module starts them all at once in a thread pool and the tests
read the outcomes (selecting one test still runs them all). Further option checks,
which fail before any model is loaded, go through :func:`lmeval.cli.main` in this
process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_llama, make_tokenizer, save_model_dir, write_gguf_header_only

from lmeval.cli import main

WORDS = [f"w{i}" for i in range(13)]
MAX_POSITIONS = 64
# Start-up plus a tiny model take well under this; a hub retry loop takes minutes.
HUB_SECONDS = 90


@dataclass(frozen=True)
class Case:
    """One ``lmeval ppl`` invocation and the values its error message must name.

    ``{root}`` in ``args`` and ``names`` is replaced by the directory of the inputs.
    """

    id: str
    args: tuple[str, ...]
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


MODEL = ("--model", "{root}/model")
TEXT = ("--data", "{root}/good.txt")
QUIET = ("-q", "--no-progress", "--threads", "1")

ERRORS = [
    Case("no-model", (*TEXT,), ("--model",)),
    Case("missing-model", ("--model", "{root}/missing-model", *TEXT), ("{root}/missing-model",)),
    Case("missing-gguf", ("--model", "{root}/missing.gguf", *TEXT), ("{root}/missing.gguf",)),
    Case(
        "not-a-model",
        ("--model", "{root}/not-a-model", *TEXT),
        ("{root}/not-a-model", "config.json"),
    ),
    Case(
        "hub-offline",
        ("--model", "lmeval-test/absent", *TEXT),
        ("'lmeval-test/absent'", "HF_HUB_OFFLINE"),
    ),
    Case(
        "gguf-architecture",
        ("--model", "{root}/madeup.gguf", *TEXT),
        ("{root}/madeup.gguf", "architecture 'madeup'"),
    ),
    Case(
        "no-bos-no-eos",
        ("--model", "{root}/no-specials", *TEXT),
        ("{root}/no-specials", "neither a BOS nor an EOS"),
    ),
    Case("data-missing", (*MODEL, "--data", "{root}/absent.jsonl"), ("{root}/absent.jsonl",)),
    Case("data-empty", (*MODEL, "--data", "{root}/empty.jsonl"), ("{root}/empty.jsonl", "empty")),
    Case(
        "data-not-utf8",
        (*MODEL, "--data", "{root}/latin1.txt"),
        ("{root}/latin1.txt", "UTF-8", "0xe9"),
    ),
    Case(
        "data-no-text-field",
        (*MODEL, "--data", "{root}/body.jsonl"),
        ("{root}/body.jsonl", "'text'", "body"),
    ),
    Case("nan-output", ("--model", "{root}/nan-model", *TEXT), ("document 0 at token 0",)),
    Case(
        "config-unknown-keys",
        (*MODEL, *TEXT, "--config", "{root}/unknown-keys.yaml"),
        ("{root}/unknown-keys.yaml", "'bogus'", "'window-sise'"),
    ),
    Case(
        "output-other-config",
        (*MODEL, *TEXT, "--output", "{root}/other-run"),
        ("{root}/other-run", "different configuration"),
    ),
    Case("window-above-limit", (*MODEL, *TEXT, "--window-size", "65"), ("65", "64")),
    Case("limit-zero", (*MODEL, *TEXT, "--limit", "0"), ("--limit", "got 0")),
    Case("stride-with-rolling", (*MODEL, *TEXT, "--stride", "4"), ("--stride", "'rolling'")),
]
ARGPARSE_ERRORS = [
    Case("batch-size-zero", (*MODEL, *TEXT, "--batch-size", "0"), ("--batch-size", "'0'")),
]
RUNS = [
    Case(
        "short-documents",
        (*MODEL, "--data", "{root}/short.jsonl", "--output", "{root}/short", "--no-progress"),
    ),
    # An error found before the model is loaded, so this case is one of the quick ones.
    Case("verbose", (*MODEL, *TEXT, "--limit", "0", "-v", "--no-progress")),
    Case("eager", (*MODEL, *TEXT, "--window-size", "7", "--output", "{root}/eager", "-q")),
    Case(
        "compiled",
        (*MODEL, *TEXT, "--window-size", "7", "--output", "{root}/compiled", "-q", "--compile"),
    ),
]
# More option checks, run through lmeval.cli.main in this process: they fail before
# any model is loaded, so a subprocess would only add start-up time.
IN_PROCESS_ERRORS = [
    Case(
        "config-invalid-values",
        (*MODEL, *TEXT, "--config", "{root}/bad-values.yaml"),
        ("--padding-side 'middle'", "--protocol 'strided'", "--dtype 'float8'"),
    ),
    Case("window-size-zero", (*MODEL, *TEXT, "--window-size", "0"), ("--window-size", "got 0")),
    # The model does not exist either: --output is checked before the model loads.
    Case(
        "output-file-before-load",
        ("--model", "{root}/no-such-model", *TEXT, "--output", "{root}/good.txt"),
        ("--output", "{root}/good.txt", "is a file"),
    ),
    Case(
        "config-directory",
        (*MODEL, *TEXT, "--config", "{root}/not-a-model"),
        ("--config", "{root}/not-a-model", "is a directory"),
    ),
    Case(
        "task-directory",
        (*MODEL, "--task", "{root}/not-a-model"),
        ("--task", "{root}/not-a-model", "is a directory"),
    ),
    Case(
        "limit-zero-llama-cpp",
        (*MODEL, *TEXT, "--protocol", "llama-cpp", "--limit", "0"),
        ("--limit", "got 0"),
    ),
    Case(
        "stride-zero",
        (*MODEL, *TEXT, "--protocol", "sliding", "--stride", "0"),
        ("--stride", "got 0"),
    ),
    Case(
        "stride-above-window",
        (*MODEL, *TEXT, "--protocol", "sliding", "--window-size", "8", "--stride", "9"),
        ("--stride 9", "--window-size 8"),
    ),
    Case(
        "llama-cpp-window-two",
        (*MODEL, *TEXT, "--protocol", "llama-cpp", "--window-size", "2"),
        ("--window-size", "llama-cpp", "got 2"),
    ),
    Case("logits-chunk-zero", (*MODEL, *TEXT, "--logits-chunk-size", "0"), ("got 0",)),
    Case("threads-zero", (*MODEL, *TEXT, "--threads", "0"), ("--threads", "got 0")),
    Case("resume-without-output", (*MODEL, *TEXT, "--resume"), ("--resume", "--output")),
    Case(
        "several-problems",
        (*MODEL, *TEXT, "--limit", "0", "--stride", "4", "--logits-chunk-size", "0"),
        ("--limit", "--stride", "--logits-chunk-size"),
    ),
]
IN_PROCESS_ARGPARSE_ERRORS = [
    Case("batch-size-word", (*MODEL, *TEXT, "--batch-size", "many"), ("--batch-size", "'many'")),
    Case("protocol-unknown", (*MODEL, *TEXT, "--protocol", "strided"), ("'strided'",)),
]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_inputs(root: Path) -> None:
    """Write every model, data and config file the cases read."""
    words = make_tokenizer(WORDS)
    model = make_tiny_llama(3 + len(WORDS), max_positions=MAX_POSITIONS, seed=0)
    save_model_dir(root / "model", model, words)
    no_specials = make_tokenizer(WORDS, bos=False, eos=False)
    save_model_dir(root / "no-specials", make_tiny_llama(1 + len(WORDS), seed=0), no_specials)
    nan_model = make_tiny_llama(3 + len(WORDS), max_positions=MAX_POSITIONS, seed=0)
    with torch.no_grad():
        nan_model.lm_head.weight[5] = float("nan")
    save_model_dir(root / "nan-model", nan_model, words)
    write_gguf_header_only(root / "madeup.gguf", "madeup")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("not a model\n")

    (root / "good.txt").write_text(" ".join(WORDS * 3) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "latin1.txt").write_bytes("w1 caf\xe9 w2".encode("latin-1"))
    (root / "body.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    short = ["", "w1", "w1 w2 w3", "w4 w5"]
    (root / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short))

    (root / "unknown-keys.yaml").write_text("bogus: 1\nwindow-sise: 8\n")
    (root / "bad-values.yaml").write_text(
        "padding-side: middle\nprotocol: strided\ndtype: float8\n"
    )
    (root / "other-run").mkdir()
    other = {"fingerprint": "0" * 64, "run": {"command": "ppl", "model": {"spec": "other"}}}
    (root / "other-run" / "config.json").write_text(json.dumps(other))


def arguments_of(case: Case, root: Path) -> list[str]:
    args = [part.format(root=root) for part in case.args]
    return args + (["--threads", "1"] if case in RUNS else list(QUIET))


def run_case(case: Case, root: Path, env: dict[str, str]) -> Outcome:
    args = arguments_of(case, root)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "lmeval", "ppl", *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    return Outcome(completed.returncode, completed.stdout, completed.stderr, seconds)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    # resolve(): lmeval names model paths resolved, so the expected names must be too.
    root = tmp_path_factory.mktemp("cli").resolve()
    write_inputs(root)
    return root


@pytest.fixture(scope="module")
def outcomes(root) -> dict[str, Future[Outcome]]:
    env = dict(os.environ)
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "HF_HOME": str(root / "hf-home"),
        "LMEVAL_CACHE_DIR": str(root / "lmeval-cache"),
    }
    cases = [*ERRORS, *ARGPARSE_ERRORS, *RUNS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {case.id: pool.submit(run_case, case, root, env) for case in cases}
        yield futures


def names_of(case: Case, root: Path) -> list[str]:
    return [name.format(root=root) for name in case.names]


@pytest.mark.parametrize("case", ERRORS, ids=lambda case: case.id)
def test_error_is_one_line(outcomes, root, case):
    outcome = outcomes[case.id].result()
    lines = outcome.stderr.splitlines()
    assert outcome.returncode == 2, outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("lmeval: error: ")
    assert "Traceback" not in outcome.stderr
    assert outcome.stdout == ""
    for name in names_of(case, root):
        assert name in lines[0]


@pytest.mark.parametrize("case", ARGPARSE_ERRORS, ids=lambda case: case.id)
def test_argparse_error_after_usage(outcomes, root, case):
    outcome = outcomes[case.id].result()
    lines = outcome.stderr.splitlines()
    assert outcome.returncode == 2, outcome.stderr
    assert lines[0].startswith("usage: lmeval ppl")
    assert lines[-1].startswith("lmeval ppl: error: ")
    assert "Traceback" not in outcome.stderr
    for name in names_of(case, root):
        assert name in lines[-1]


def test_hub_offline_error_is_fast(outcomes):
    assert outcomes["hub-offline"].result().seconds < HUB_SECONDS


def test_verbose_shows_traceback(outcomes, root):
    outcome = outcomes["verbose"].result()
    assert outcome.returncode == 2
    assert "Traceback (most recent call last)" in outcome.stderr
    assert outcome.stderr.splitlines()[-1] == "lmeval: error: --limit must be at least 1, got 0"


def test_short_documents_counted_and_skipped(outcomes, root):
    outcome = outcomes["short-documents"].result()
    assert outcome.returncode == 0, outcome.stderr
    results = json.loads((root / "short" / "results.json").read_text())
    assert results["metrics"]["num_documents"] == 4
    assert results["metrics"]["num_skipped"] == 2
    assert results["metrics"]["num_tokens"] == 5
    assert results["skipped"] == [
        {"index": 0, "id": "0", "reason": "empty"},
        {"index": 1, "id": "1", "reason": "one token"},
    ]


def test_no_progress_hides_every_bar(outcomes):
    # --no-progress without -q: log lines remain, progress bars of any library do not.
    stderr = outcomes["short-documents"].result().stderr
    assert "\r" not in stderr
    assert "it/s" not in stderr
    assert "INFO lmeval" in stderr


def test_compiled_decoder_gives_same_numbers(outcomes, root):
    # Windows of 7 inputs with a last, shorter one: the compiled graph must serve
    # both lengths, since its shapes are dynamic.
    for name in ("eager", "compiled"):
        outcome = outcomes[name].result()
        assert outcome.returncode == 0, outcome.stderr
    eager = json.loads((root / "eager" / "results.json").read_text())
    compiled = json.loads((root / "compiled" / "results.json").read_text())
    assert eager["model"]["compiled"] is False
    assert compiled["model"]["compiled"] is True
    assert compiled["metrics"]["num_tokens"] == eager["metrics"]["num_tokens"]
    assert compiled["metrics"]["sum_nll"] == pytest.approx(eager["metrics"]["sum_nll"], rel=1e-5)
    assert compiled["metrics"]["num_correct"] == eager["metrics"]["num_correct"]


@pytest.fixture
def main_in_process(root, monkeypatch):
    """Return a function that runs ``lmeval ppl ARGS`` through ``main`` in this process."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LMEVAL_CACHE_DIR", str(root / "lmeval-cache"))
    return lambda args: main(["ppl", *args])


@pytest.mark.parametrize("case", IN_PROCESS_ERRORS, ids=lambda case: case.id)
def test_option_error_is_one_line(main_in_process, capsys, root, case):
    status = main_in_process([*(part.format(root=root) for part in case.args), "-q"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lmeval: error: ")
    for name in names_of(case, root):
        assert name in lines[0]


@pytest.mark.parametrize("case", IN_PROCESS_ARGPARSE_ERRORS, ids=lambda case: case.id)
def test_argparse_error_exits_2(main_in_process, capsys, root, case):
    with pytest.raises(SystemExit) as raised:
        main_in_process([part.format(root=root) for part in case.args])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert raised.value.code == 2
    assert last_line.startswith("lmeval ppl: error: ")
    for name in names_of(case, root):
        assert name in last_line


def test_run_prints_table_and_progress(main_in_process, capsys, root):
    args = [part.format(root=root) for part in (*MODEL, *TEXT)]
    status = main_in_process([*args, "-q", "--threads", "1"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    data_line = next(line for line in lines if line.startswith("data "))
    assert status == 0, captured.err
    assert lines[0].startswith("perplexity ")
    assert data_line.split(None, 1)[1] == str(root / "good.txt")
    assert "scoring: 100%" in captured.err


def test_help_chunk_defaults_match_scorers():
    from lmeval.cli import CHUNK_MIB
    from lmeval.kl_cli import KL_CHUNK_MIB
    from lmeval.kl_scoring import KL_CHUNK_BYTES
    from lmeval.scoring import CHUNK_BYTES

    assert CHUNK_MIB * 2**20 == CHUNK_BYTES
    assert KL_CHUNK_MIB * 2**20 == KL_CHUNK_BYTES
