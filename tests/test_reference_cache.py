"""lmeval.reference_cache: exact and compact caches, their bounds and identity checks."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import make_tiny_llama, make_tokenizer, save_model_dir

from lmeval import reference_cache
from lmeval.errors import ConfigError, VocabularyError
from lmeval.kl import TokenDivergences
from lmeval.kl_run import KLConfig, run_kl
from lmeval.kl_scoring import LiveReference, compare_windows
from lmeval.reference_cache import CacheOptions, CacheWriter, ReferenceCache
from lmeval.scoring import WindowScorer
from lmeval.windows import rolling_windows

WORDS = [f"w{i}" for i in range(20)]
VOCAB = 3 + len(WORDS)
DIVERGENCES = ("kl_model_ref", "kl_ref_model", "js", "tv")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One thread is faster for tiny models, much more so on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-models")
    tokenizer = make_tokenizer(WORDS)
    other = make_tokenizer([*WORDS[:4], "other", *WORDS[5:]])
    paths = {
        "a": save_model_dir(root / "a", make_tiny_llama(VOCAB, seed=0), tokenizer),
        "b": save_model_dir(root / "b", make_tiny_llama(VOCAB, seed=1), tokenizer),
        "other": save_model_dir(root / "other", make_tiny_llama(VOCAB, seed=1), other),
    }
    rng = np.random.default_rng(0)
    for name, lengths in (("data", (40, 25, 60)), ("other-data", (30, 30))):
        rows = [{"text": " ".join(rng.choice(WORDS, size=n))} for n in lengths]
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def config(dirs, **options) -> KLConfig:
    options.setdefault("data", str(dirs["data"]))
    options.setdefault("progress", False)
    options.setdefault("threads", 1)
    for key in ("model", "reference"):
        if options.get(key) in dirs:
            options[key] = str(dirs[options[key]])
    return KLConfig(**options)


def write_cache(dirs, path: Path, **options) -> dict:
    return run_kl(
        config(
            dirs, reference="a", save_reference=str(path), window_size=16, batch_size=2, **options
        )
    )


@pytest.fixture(scope="module")
def exact_cache(dirs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("caches") / "exact.safetensors"
    write_cache(dirs, path)
    return path


def test_exact_cache_of_the_model_itself_gives_zero(dirs, exact_cache):
    metrics = run_kl(config(dirs, model="a", reference_cache=str(exact_cache)))["metrics"]
    for name in ("kl_model_ref", "kl_ref_model"):
        assert metrics[name]["mean"] == 0
        assert metrics[name]["max"] == 0
    assert metrics["js"] == 0
    assert metrics["top1_agreement"] == 1.0
    assert metrics["delta_p"]["rms"] == 0


def test_exact_cache_equals_live_reference(dirs, exact_cache):
    live = run_kl(config(dirs, model="b", reference="a", window_size=16, batch_size=2))
    cached = run_kl(config(dirs, model="b", reference_cache=str(exact_cache)))
    for name in ("kl_model_ref", "kl_ref_model"):
        assert cached["metrics"][name]["mean"] == live["metrics"][name]["mean"]
        assert cached["metrics"][name]["p99"] == live["metrics"][name]["p99"]
    for name in ("js", "top1_agreement", "top5_overlap", "perplexity_ref", "log_ppl_ratio"):
        assert cached["metrics"][name] == live["metrics"][name], name
    assert cached["reference"] == live["reference"]
    assert cached["reference_cache"]["estimate"] == "exact"


def test_cache_takes_window_and_batch_from_file(dirs, exact_cache):
    results = run_kl(config(dirs, model="b", reference_cache=str(exact_cache)))
    assert results["protocol"]["window_size"] == 16
    assert results["protocol"]["batch_size"] == 2


def test_cache_size_is_stated(dirs, exact_cache):
    record = ReferenceCache.open(exact_cache).record()
    num_positions = 40 + 25 + 60
    assert record["num_positions"] == num_positions
    assert record["bytes"] == exact_cache.stat().st_size
    logprob_bytes = num_positions * VOCAB * 4
    assert logprob_bytes < record["bytes"] < logprob_bytes + num_positions * 64 + 100_000


def test_cache_is_a_safetensors_file(exact_cache):
    with safe_open(str(exact_cache), framework="pt") as file:
        assert reference_cache.METADATA_KEY in file.metadata()
        assert file.get_slice("logprobs").get_shape() == [125, VOCAB]
        assert set(file.keys()) >= {"top_ids", "target_logprob", "entropy"}
        logprobs = file.get_tensor("logprobs")
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(125), atol=1e-5, rtol=0)


def test_float16_cache_keeps_identity_at_zero(dirs, tmp_path, exact_cache):
    path = tmp_path / "half.safetensors"
    written = write_cache(dirs, path, cache_dtype="float16")
    assert written["reference_cache"]["dtype"] == "float16"
    assert path.stat().st_size < exact_cache.stat().st_size
    same = run_kl(config(dirs, model="a", reference_cache=str(path)))["metrics"]
    assert same["kl_model_ref"]["max"] == 0
    assert same["kl_ref_model"]["max"] == 0
    half = run_kl(config(dirs, model="b", reference_cache=str(path)))["metrics"]
    full = run_kl(config(dirs, model="b", reference_cache=str(exact_cache)))["metrics"]
    assert half["kl_ref_model"]["mean"] == pytest.approx(full["kl_ref_model"]["mean"], abs=1e-3)


# Compact caches ------------------------------------------------------------------------


def per_token(model, cache_path: Path, windows) -> TokenDivergences:
    cache = ReferenceCache.open(cache_path)
    reader = cache.reader(windows, chunk_size=7)
    parts = compare_windows(WindowScorer(model, chunk_size=7), reader, windows, VOCAB)
    return TokenDivergences.concatenate(parts)


def write_direct(path: Path, reference, windows, options: CacheOptions) -> None:
    """Write a cache for ``windows`` without the corpus machinery of run_kl."""
    writer = CacheWriter(path, options, windows, VOCAB, {"vocabulary": {"tokens": []}})
    side = LiveReference(WindowScorer(reference, chunk_size=7), VOCAB, recorder=writer)
    for batch_indices in WindowScorer(reference).batches(windows):
        for _chunk in side.chunks(batch_indices, [windows[i] for i in batch_indices]):
            pass
    writer.finish()


def test_compact_cache_is_a_lower_bound(tmp_path):
    reference, model = make_tiny_llama(VOCAB, seed=0), make_tiny_llama(VOCAB, seed=1)
    rng = np.random.default_rng(1)
    windows = [
        window
        for index in range(4)
        for window in rolling_windows(rng.integers(3, VOCAB, 30).tolist(), 1, 12, index)
    ]
    write_direct(tmp_path / "exact", reference, windows, CacheOptions())
    write_direct(tmp_path / "compact", reference, windows, CacheOptions("compact", top_k=5))
    exact = per_token(model, tmp_path / "exact", windows)
    compact = per_token(model, tmp_path / "compact", windows)
    for name in DIVERGENCES:
        # The data-processing inequality, position by position, in both directions.
        assert (getattr(compact, name) <= getattr(exact, name) + 1e-6).all(), name
        assert (getattr(compact, name) < getattr(exact, name)).mean() > 0.5, name
    for name in ("top1_agree", "top5_overlap", "logprob_ref", "logprob_model", "entropy_ref"):
        np.testing.assert_array_equal(getattr(compact, name), getattr(exact, name), err_msg=name)
    assert (compact.rest_mass_ref > 0).all()
    assert exact.rest_mass_ref is None


def test_compact_cache_of_the_model_itself_gives_zero(tmp_path):
    reference = make_tiny_llama(VOCAB, seed=0)
    windows = rolling_windows(list(range(3, VOCAB)) * 2, 1, 16)
    write_direct(tmp_path / "compact", reference, windows, CacheOptions("compact", top_k=5))
    result = per_token(make_tiny_llama(VOCAB, seed=0), tmp_path / "compact", windows)
    for name in DIVERGENCES:
        assert (getattr(result, name) == 0).all(), name


def test_compact_run_states_its_bound(dirs, tmp_path, exact_cache):
    path = tmp_path / "compact.safetensors"
    write_cache(dirs, path, cache_format="compact", cache_top_k=5)
    results = run_kl(config(dirs, model="b", reference_cache=str(path)))
    exact = run_kl(config(dirs, model="b", reference_cache=str(exact_cache)))
    assert results["estimate"] == "lower bound"
    assert results["metrics"]["kl_ref_model"]["estimate"] == "lower bound"
    assert "lower bound, in both directions" in results["reference_cache"]["bound"]
    assert results["metrics"]["reference_rest_mass"]["mean"] > 0
    for name in ("kl_model_ref", "kl_ref_model"):
        assert results["metrics"][name]["mean"] <= exact["metrics"][name]["mean"]
    assert path.stat().st_size < exact_cache.stat().st_size


# Mismatches ----------------------------------------------------------------------------


def test_cache_rejects_other_data(dirs, exact_cache):
    with pytest.raises(ConfigError, match="written on other data: its documents_sha256"):
        run_kl(
            config(dirs, model="b", reference_cache=str(exact_cache), data=str(dirs["other-data"]))
        )


def test_cache_rejects_other_window(dirs, exact_cache):
    with pytest.raises(ConfigError, match="written with window_size 16, this run uses 8"):
        run_kl(config(dirs, model="b", reference_cache=str(exact_cache), window_size=8))


def test_cache_rejects_other_protocol(dirs, exact_cache):
    with pytest.raises(ConfigError, match="written with protocol 'rolling'"):
        run_kl(config(dirs, model="b", reference_cache=str(exact_cache), protocol="sliding"))


def test_cache_rejects_other_vocabulary(dirs, exact_cache):
    with pytest.raises(VocabularyError, match="differ at id 7"):
        run_kl(config(dirs, model="other", reference_cache=str(exact_cache)))


def test_cache_rejects_other_reference(dirs, exact_cache):
    with pytest.raises(ConfigError, match="written for reference"):
        run_kl(config(dirs, model="b", reference="b", reference_cache=str(exact_cache)))


def test_cache_not_found_or_not_a_cache(dirs, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ReferenceCache.open(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        ReferenceCache.open(junk)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a-directory", "is a directory"),
        ("a-file/cache.safetensors", "is a file, not a directory"),
        ("missing/cache.safetensors", "not found"),
    ],
)
def test_save_path_checked_before_loading(dirs, tmp_path, name, message):
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_text("not a directory\n")
    # The reference does not exist either: the path is checked before it loads.
    bad = config(dirs, reference=str(tmp_path / "no-model"), save_reference=str(tmp_path / name))
    with pytest.raises(ConfigError, match=message):
        run_kl(bad)


def test_cache_needs_disk_space(dirs, tmp_path, monkeypatch):
    usage = SimpleNamespace(total=10**9, used=10**9 - 100, free=100)
    monkeypatch.setattr(reference_cache.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(ConfigError, match="needs .* but .* has 100 B free"):
        write_cache(dirs, tmp_path / "big.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_no_cache(dirs, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(CacheWriter, "write", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_cache(dirs, tmp_path / "cache.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_command_writes_and_reads_cache(dirs, tmp_path):
    cache = tmp_path / "ref.safetensors"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["--data", str(dirs["data"]), "--no-progress", "--threads", "1"]
    write = subprocess.run(
        [sys.executable, "-m", "lmeval", "kl", "--reference", str(dirs["a"]),
         "--save-reference", str(cache), "--cache-format", "compact", "--cache-top-k", "5",
         "--window-size", "16",
         *common],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert write.returncode == 0, write.stderr
    assert f"wrote reference cache {cache}: compact, 125 positions" in write.stdout
    read = subprocess.run(
        [sys.executable, "-m", "lmeval", "kl", "--model", str(dirs["b"]),
         "--reference-cache", str(cache), "--json", *common],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr
    results = json.loads(read.stdout)
    assert results["metrics"]["kl_model_ref"]["estimate"] == "lower bound"
    assert results["reference_cache"]["top_k"] == 5
