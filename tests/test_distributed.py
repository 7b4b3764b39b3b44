"""Data-parallel runs: real ``torchrun`` subprocesses (gloo, CPU) against one process.

Each rank of a torchrun gets ``cores // ranks`` threads, and the single-process runs
here use that many threads too, so that both do the same float operations in the same
order: per-document rows must then be identical, and corpus metrics equal to 1e-9
relative. Every torchrun uses its own free loopback port for the rendezvous.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from tiny import make_tiny_llama, make_tokenizer, save_model_dir

from lmeval.cli import main
from lmeval.distributed import Launch, detect_launch, shard_groups, threads_per_rank
from lmeval.errors import ConfigError
from lmeval.results import DOCUMENTS_FILE, RESULTS_FILE, read_rows

WORDS = [f"w{i}" for i in range(20)]
# Uneven on purpose: a one-token document (skipped), documents of one and of several
# windows of 16 tokens, so that the scoring groups differ in size.
LENGTHS = [1, 3, 120, 7, 45, 80, 2, 30, 15, 60, 9]
WINDOW = ("--window-size", "16")
RANKS = 2
# Start-up of two ranks (torch and transformers imports) takes about 20 s on a busy
# two-core machine; a hung rendezvous would take the gloo timeout.
TORCHRUN_SECONDS = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_documents(path: Path, lengths: list[int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choices(WORDS, k=length)) for length in lengths]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = make_tokenizer(WORDS)
    for seed in (0, 1):
        model = make_tiny_llama(len(tokenizer), max_positions=64, seed=seed)
        save_model_dir(root / f"model{seed}", model, tokenizer)
    write_documents(root / "docs.txt", LENGTHS)
    write_documents(root / "two.txt", [5, 9])
    return root


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def single(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m lmeval ARGS`` as one process with a rank's thread count."""
    threads = str(threads_per_rank(None, RANKS))
    command = [sys.executable, "-m", "lmeval", *args, "--threads", threads, "--no-progress"]
    return _run(command)


def torchrun(*args: str, ranks: int = RANKS) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc-per-node RANKS -m lmeval ARGS`` on a free loopback port."""
    return _run(_torchrun_command(args, ranks))


def _torchrun_command(args, ranks: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "lmeval",
        *args,
    ]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, capture_output=True, text=True, env=environment(), timeout=TORCHRUN_SECONDS
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def results_of(directory: Path) -> dict:
    return json.loads((directory / RESULTS_FILE).read_text())


def assert_close(expected, actual, path: str = "") -> None:
    """Compare two JSON values, floats to 1e-9 relative."""
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), path
        for key in expected:
            assert_close(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(expected) == len(actual), path
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            assert_close(left, right, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert math.isclose(expected, actual, rel_tol=1e-9, abs_tol=1e-300), path
    else:
        assert expected == actual, path


# --- torchrun against one process ---------------------------------------------------


@pytest.fixture(scope="module")
def ppl_runs(root) -> tuple[Path, Path, subprocess.CompletedProcess]:
    common = ["ppl", "--model", str(root / "model0"), "--data", str(root / "docs.txt")]
    common += ["--sample-by", "line", *WINDOW, "--save-tokens"]
    one, ranks = root / "ppl-one", root / "ppl-ranks"
    single(*common, "--output", str(one))
    done = torchrun(*common, "--output", str(ranks))
    return one, ranks, done


def test_ppl_rows_equal_single_process(ppl_runs):
    one, ranks, _ = ppl_runs
    expected = read_rows(one / DOCUMENTS_FILE)
    assert len(expected) == len(LENGTHS)
    assert read_rows(ranks / DOCUMENTS_FILE) == expected


def test_ppl_metrics_equal_single_process(ppl_runs):
    one, ranks, _ = ppl_runs
    expected, actual = results_of(one), results_of(ranks)
    assert_close(expected["metrics"], actual["metrics"])
    assert_close(expected["diagnostics"], actual["diagnostics"])
    assert actual["environment"]["world_size"] == RANKS
    assert actual["environment"]["torch_threads"] == threads_per_rank(None, RANKS)


def test_ppl_tokens_gathered_from_every_rank(ppl_runs):
    one, ranks, _ = ppl_runs
    expected = pq.read_table(one / "tokens.parquet")
    actual = pq.read_table(ranks / "tokens.parquet")
    assert actual.num_rows == expected.num_rows
    assert actual.equals(expected)


def test_ppl_rank_zero_alone_prints(ppl_runs):
    _, ranks, done = ppl_runs
    table_starts = [line for line in done.stdout.splitlines() if line.startswith("perplexity ")]
    assert len(table_starts) == 1
    assert not list(ranks.glob("documents.rank*.jsonl"))


def test_ppl_one_bar_counts_all_ranks(ppl_runs):
    _, ranks, done = ppl_runs
    total = results_of(ranks)["metrics"]["num_tokens"]
    assert done.stderr.count("scoring:   0%") == 1
    assert "scoring: 100%" in done.stderr
    assert f"{total}/{total}" in done.stderr


def test_kl_ranks_equal_single_process(root):
    common = ["kl", "--model", str(root / "model1"), "--reference", str(root / "model0")]
    common += ["--data", str(root / "docs.txt"), "--sample-by", "line", *WINDOW]
    one, ranks = root / "kl-one", root / "kl-ranks"
    single(*common, "--output", str(one), "-q")
    done = torchrun(*common, "--output", str(ranks), "--no-progress")
    assert read_rows(ranks / DOCUMENTS_FILE) == read_rows(one / DOCUMENTS_FILE)
    expected, actual = results_of(one), results_of(ranks)
    assert_close(expected["metrics"], actual["metrics"])
    assert_close(expected["worst_tokens"], actual["worst_tokens"])
    assert_close(expected["vocabulary"], actual["vocabulary"])
    assert done.stdout.count("KL(model || reference)") == 1, done.stdout


def test_accelerate_launch_equals_single_process(ppl_runs, root, tmp_path):
    # accelerate launch --multi_gpu starts the ranks through torch.distributed's elastic
    # launcher, on the CPU with gloo when there is no GPU.
    one, _, _ = ppl_runs
    args = ["ppl", "--model", str(root / "model0"), "--data", str(root / "docs.txt")]
    args += ["--sample-by", "line", *WINDOW, "--output", str(tmp_path / "run"), "-q"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", str(RANKS), "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port()), "-m", "lmeval", *args]
    _run(launcher)
    assert read_rows(tmp_path / "run" / DOCUMENTS_FILE) == read_rows(one / DOCUMENTS_FILE)
    assert results_of(tmp_path / "run")["environment"]["world_size"] == RANKS


def test_more_ranks_than_documents(root):
    # Two short documents form one scoring group, so ranks 1 and 2 score nothing.
    common = ["ppl", "--model", str(root / "model0"), "--data", str(root / "two.txt")]
    common += ["--sample-by", "line", *WINDOW]
    one, ranks = root / "idle-one", root / "idle-ranks"
    single(*common, "--output", str(one), "-q")
    torchrun(*common, "--output", str(ranks), "--no-progress", ranks=3)
    assert read_rows(ranks / DOCUMENTS_FILE) == read_rows(one / DOCUMENTS_FILE)
    assert_close(results_of(one)["metrics"], results_of(ranks)["metrics"])


def test_rank_zero_error_printed_once(root, tmp_path):
    # Rank 0 alone checks the output directory and sends the error to the others.
    output = tmp_path / "taken"
    output.mkdir()
    (output / RESULTS_FILE).write_text("{}")
    args = ["ppl", "--model", str(root / "model0"), "--data", str(root / "two.txt")]
    args += ["--output", str(output), "--no-progress"]
    done = subprocess.run(
        _torchrun_command(args, RANKS),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=TORCHRUN_SECONDS,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("lmeval: error")]
    assert len(errors) == 1, done.stderr
    assert "contains results.json but no config.json" in errors[0]


def test_drift_ranks_equal_single_process(root, tmp_path):
    checkpoints = []
    for step, seed in ((2, 1), (1, 0)):
        path = tmp_path / f"checkpoint-{step}"
        path.symlink_to(root / f"model{seed}")
        checkpoints.append(str(path))
    common = ["drift", "--reference", str(root / "model0"), *checkpoints]
    common += ["--data", str(root / "docs.txt"), "--sample-by", "line", *WINDOW]
    one, ranks = tmp_path / "one", tmp_path / "ranks"
    single(*common, "--output", str(one), "-q")
    torchrun(*common, "--output", str(ranks), "--no-progress")
    expected = json.loads((one / "drift.json").read_text())["rows"]
    actual = json.loads((ranks / "drift.json").read_text())["rows"]
    assert [row["step"] for row in actual] == [1, 2]
    for row in (*expected, *actual):
        row.pop("path")
    assert_close(expected, actual)
    cache = "reference-cache.safetensors"
    stored, shared = load_file(one / cache), load_file(ranks / cache)
    assert stored.keys() == shared.keys()
    for name, values in stored.items():
        assert np.array_equal(values, shared[name]), name


# --- resuming under torchrun --------------------------------------------------------


def test_resume_merges_rank_files(ppl_runs, root, tmp_path):
    """A run killed with rows in documents.jsonl and a rank file resumes without loss."""
    one, ranks, _ = ppl_runs
    rows = read_rows(ranks / DOCUMENTS_FILE)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_bytes((ranks / "config.json").read_bytes())
    lines = [json.dumps(row) + "\n" for row in rows]
    (killed / DOCUMENTS_FILE).write_text("".join(lines[:3]) + lines[3][:20])
    (killed / "documents.rank1.jsonl").write_text("".join(lines[5:7]) + lines[7][:10])
    args = ["ppl", "--model", str(root / "model0"), "--data", str(root / "docs.txt")]
    args += ["--sample-by", "line", *WINDOW, "--output", str(killed)]
    done = torchrun(*args, "--resume", "--no-progress")
    assert read_rows(killed / DOCUMENTS_FILE) == read_rows(one / DOCUMENTS_FILE)
    assert not list(killed.glob("documents.rank*.jsonl"))
    assert results_of(killed)["timing"]["resumed_documents"] == 5
    assert_close(results_of(one)["metrics"], results_of(killed)["metrics"])
    assert "resuming: 5 documents already scored" in done.stderr


def test_killed_torchrun_resumes(root, tmp_path):
    data = write_documents(tmp_path / "many.txt", [40] * 300, seed=3)
    args = ["ppl", "--model", str(root / "model0"), "--data", str(data), "--sample-by", "line"]
    args += [*WINDOW, "--output", str(tmp_path / "run"), "--no-progress", "-q"]
    process = subprocess.Popen(
        _torchrun_command(args, RANKS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        start_new_session=True,
    )
    rank_file = tmp_path / "run" / "documents.rank1.jsonl"
    deadline = time.monotonic() + TORCHRUN_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if rank_file.exists() and len(read_rows(rank_file)) >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {row["index"] for row in read_rows(tmp_path / "run" / DOCUMENTS_FILE)}
    before |= {row["index"] for row in read_rows(rank_file)}
    assert 8 <= len(before) < 300

    done = torchrun(*args, "--resume", "-v")
    single(*args[:-4], "--output", str(tmp_path / "one"), "-q")
    rows = read_rows(tmp_path / "run" / DOCUMENTS_FILE)
    assert rows == read_rows(tmp_path / "one" / DOCUMENTS_FILE)
    assert f"resuming: {len(before)} documents already scored" in done.stderr


# --- launch detection and sharding, in this process -----------------------------------


def test_detect_launch_without_variables():
    assert detect_launch({}) is None
    assert detect_launch({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None


def test_detect_launch_reads_ranks():
    environ = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert detect_launch(environ) == Launch(rank=3, world_size=4, local_rank=1, local_world_size=2)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK missing"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 with WORLD_SIZE=2"),
    ],
)
def test_detect_launch_rejects_bad_environment(environ, message):
    with pytest.raises(ConfigError, match=message):
        detect_launch(environ)


def test_threads_per_rank_shares_cores():
    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(None, 1) == cores
    assert threads_per_rank(None, cores * 4) == 1
    assert threads_per_rank(3, 8) == 3


def test_shard_groups_balances_tokens():
    # Largest first: 50 -> rank 0, 40 -> 1, 30 -> 1, 20 -> 0, then 10 ties at 70 and
    # goes to the lower rank.
    assert shard_groups([10, 50, 20, 30, 40], 2) == [[0, 1, 2], [3, 4]]
    assert shard_groups([10, 50, 20, 30, 40], 1) == [[0, 1, 2, 3, 4]]


def test_shard_groups_more_ranks_than_groups():
    assert shard_groups([5, 7], 4) == [[1], [0], [], []]
    assert shard_groups([], 3) == [[], [], []]


# --- model placement ----------------------------------------------------------------


def test_device_map_auto_matches_plain_run(root, tmp_path, capsys):
    common = ["ppl", "--model", str(root / "model0"), "--data", str(root / "docs.txt")]
    common += ["--sample-by", "line", *WINDOW, "--threads", "1", "--no-progress", "-q"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    mapped_args = ["--device-map", "auto", "--max-memory", "cpu=1GiB"]
    assert main([*common, *mapped_args, "--output", str(tmp_path / "mapped")]) == 0
    mapped = tmp_path / "mapped"
    assert read_rows(mapped / DOCUMENTS_FILE) == read_rows(tmp_path / "plain" / DOCUMENTS_FILE)
    assert results_of(mapped)["config"]["device_map"] == "auto"
    assert results_of(mapped)["config"]["max_memory"] == ["cpu=1GiB"]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--device-map", "auto", "--max-memory", "cpu"], ["'cpu'", "DEVICE=SIZE"]),
        (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], ["'gpu0'", "cuda:N"]),
        (["--device-map", "auto", "--max-memory", "cpu=8 GiBs"], ["'8 GiBs'", "GiB"]),
        (["--device-map", "auto", "--max-memory", "cpu=1GiB", "cpu=2GiB"], ["twice"]),
        (["--max-memory", "cpu=8GiB"], ["--device-map auto"]),
        (["--device-map", "auto", "--device", "cuda:1"], ["cuda:1", "drop --device"]),
        (["--device-map", "auto", "--max-memory", "7=1GiB"], ["GPU 7", "visible"]),
    ],
)
def test_placement_errors_are_one_line(root, capsys, args, names):
    common = ["ppl", "--model", str(root / "model0"), "--data", str(root / "two.txt")]
    status = main([*common, *args, "--threads", "1", "--no-progress", "-q"])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("lmeval: error: ")
    for name in names:
        assert name in lines[0]
