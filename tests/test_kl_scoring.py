"""lmeval.kl_scoring and lmeval.kl_run on tiny real models: closed forms, equivalences,
vocabulary checks, results.json and the ``lmeval kl`` command."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from handset import bigram_llama, cycle_table
from tiny import make_tiny_llama, make_tokenizer, save_model_dir

from lmeval.cli import main
from lmeval.errors import ConfigError, ScoringError, VocabularyError
from lmeval.kl import TokenDivergences
from lmeval.kl_run import KLConfig, run_kl
from lmeval.kl_scoring import (
    ComparisonOptions,
    LiveReference,
    WorstTokens,
    check_vocabularies,
    compare_windows,
    token_list,
)
from lmeval.scoring import WindowScorer
from lmeval.windows import rolling_windows

WORDS = [f"w{i}" for i in range(20)]
VOCAB = 3 + len(WORDS)  # <unk>, <s>, </s>, then the words
METRIC_KEYS = {
    "kl_model_ref",
    "kl_ref_model",
    "js",
    "top1_agreement",
    "top5_overlap",
    "delta_p",
    "perplexity_model",
    "perplexity_ref",
    "log_ppl_ratio",
    "k1",
    "k2",
    "k3",
    "num_tokens",
}
LADDER_KEYS = {"mean", "stderr", "median", "p90", "p95", "p99", "p999", "max"}


def random_tokens(length: int, seed: int, vocab: int = VOCAB) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=length).tolist()


def some_windows(window_size: int = 16):
    documents = [random_tokens(n, seed=n) for n in (5, 30, 47, 2, 20)]
    return [
        window
        for index, tokens in enumerate(documents)
        for window in rolling_windows(tokens, 1, window_size, index)
    ]


def compare(model, reference, windows, vocab=VOCAB, **scorer_options):
    model_scorer = WindowScorer(model, **scorer_options)
    reference_side = LiveReference(WindowScorer(reference, **scorer_options), vocab)
    parts = compare_windows(model_scorer, reference_side, windows, vocab)
    return TokenDivergences.concatenate(parts)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One thread is faster for tiny models, much more so on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pair():
    return make_tiny_llama(VOCAB, seed=0), make_tiny_llama(VOCAB, seed=1)


# Closed forms and exact zeros --------------------------------------------------------


def test_bigram_models_closed_form():
    # Each model puts p on the next token of a cycle and spreads 1 - p evenly, so at
    # every position KL(P || Q) = p ln(p / q) + (1 - p) ln((1 - p) / (1 - q)).
    p, q, vocab = 0.8, 0.5, 8
    model, reference = bigram_llama(cycle_table(vocab, p)), bigram_llama(cycle_table(vocab, q))
    tokens = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    result = compare(model, reference, rolling_windows(tokens, 0, 4), vocab)
    kl_pq = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    kl_qp = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    np.testing.assert_allclose(result.kl_model_ref, kl_pq, rtol=1e-4)
    np.testing.assert_allclose(result.kl_ref_model, kl_qp, rtol=1e-4)
    np.testing.assert_allclose(result.tv, p - q, rtol=1e-4)
    m = (p + q) / 2
    rest_m = (1 - m) / (vocab - 1)
    js = 0.5 * (p * math.log(p / m) + (1 - p) * math.log((1 - p) / (vocab - 1) / rest_m))
    js += 0.5 * (q * math.log(q / m) + (1 - q) * math.log((1 - q) / (vocab - 1) / rest_m))
    np.testing.assert_allclose(result.js, js, rtol=1e-4)
    np.testing.assert_allclose(
        np.exp(result.logprob_model) - np.exp(result.logprob_ref), p - q, rtol=1e-4
    )
    assert result.top1_agree.all()


def test_two_copies_of_a_model_give_exactly_zero():
    model, copy = make_tiny_llama(VOCAB, seed=0), make_tiny_llama(VOCAB, seed=0)
    result = compare(model, copy, some_windows(), batch_size=2, chunk_size=5)
    for name in ("kl_model_ref", "kl_ref_model", "js", "tv"):
        assert (getattr(result, name) == 0).all(), name
    assert result.top1_agree.all()
    assert (result.top5_overlap == 1).all()
    assert (result.logprob_model == result.logprob_ref).all()


def test_different_models_give_positive_kl(tiny_pair):
    result = compare(*tiny_pair, some_windows())
    assert (result.kl_model_ref > 0).all()
    assert (result.kl_ref_model > 0).all()
    assert not np.array_equal(result.kl_model_ref, result.kl_ref_model)


# Equivalences -------------------------------------------------------------------------


def test_chunked_equals_unchunked(tiny_pair):
    windows = some_windows(window_size=32)
    chunked = compare(*tiny_pair, windows, chunk_size=3)
    whole = compare(*tiny_pair, windows, chunk_size=10_000)
    for name in ("kl_model_ref", "kl_ref_model", "js", "tv", "logprob_model", "logprob_ref"):
        np.testing.assert_allclose(
            getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-7
        )
    assert (chunked.top1_agree == whole.top1_agree).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_size_does_not_change_results(tiny_pair, padding_side):
    windows = some_windows()
    one = compare(*tiny_pair, windows, batch_size=1)
    many = compare(*tiny_pair, windows, batch_size=4, padding_side=padding_side)
    for name in ("kl_model_ref", "kl_ref_model", "js", "tv", "logprob_model", "logprob_ref"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-5, atol=1e-6)
    assert (many.top1_agree == one.top1_agree).all()


# Vocabularies --------------------------------------------------------------------------


def padded_copy(model, extra_rows: int):
    """Return ``model`` with ``extra_rows`` random rows appended to its vocabulary."""
    padded = make_tiny_llama(VOCAB + extra_rows, seed=7)
    state = padded.state_dict()
    for name, tensor in model.state_dict().items():
        if state[name].shape == tensor.shape:
            state[name] = tensor
        else:
            state[name][: tensor.shape[0]] = tensor
    padded.load_state_dict(state)
    return padded


def test_padded_vocabulary_compares_on_shared_ids():
    model = make_tiny_llama(VOCAB, seed=0)
    padded = padded_copy(model, extra_rows=9)
    tokens = token_list(make_tokenizer(WORDS))
    vocabulary = check_vocabularies(tokens, tokens, VOCAB + 9, VOCAB)
    assert vocabulary.size == VOCAB
    assert vocabulary.record()["renormalized"] == ["model"]

    options = ComparisonOptions()
    parts = compare_windows(
        WindowScorer(padded),
        LiveReference(WindowScorer(model), VOCAB),
        some_windows(),
        vocabulary.size,
        options=options,
    )
    result = TokenDivergences.concatenate(parts)
    # The first VOCAB rows are the reference's, so after dropping the extra rows and
    # renormalizing, the distributions agree up to float rounding.
    np.testing.assert_allclose(result.kl_model_ref, 0, atol=1e-6)
    np.testing.assert_allclose(result.kl_ref_model, 0, atol=1e-6)
    assert options.dropped.record()["mean"] > 0


def test_mismatched_tokenizers_are_rejected():
    mine = token_list(make_tokenizer(WORDS))
    theirs = token_list(make_tokenizer([*WORDS[:4], "other", *WORDS[5:]]))
    with pytest.raises(VocabularyError, match="differ at id 7: the model's maps it to 'w4'"):
        check_vocabularies(mine, theirs, VOCAB, VOCAB)


def test_tokenizers_of_different_sizes_are_rejected():
    mine = token_list(make_tokenizer(WORDS))
    theirs = token_list(make_tokenizer(WORDS[:-1]))
    with pytest.raises(VocabularyError, match=f"differ at id {VOCAB - 1}"):
        check_vocabularies(mine, theirs, VOCAB, VOCAB)


def test_output_layer_smaller_than_tokenizer_is_rejected():
    tokens = token_list(make_tokenizer(WORDS))
    with pytest.raises(VocabularyError, match=f"model's output layer has {VOCAB - 2} rows"):
        check_vocabularies(tokens, tokens, VOCAB - 2, VOCAB)


# Failures and worst tokens ---------------------------------------------------------------


def test_nan_logits_raise_scoring_error():
    model = make_tiny_llama(VOCAB, seed=0)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    with pytest.raises(ScoringError, match="NaN .* in document 3 at token 0"):
        compare(model, make_tiny_llama(VOCAB, seed=0), rolling_windows([4, 5, 6], 1, 8, 3))


def test_worst_tokens_are_the_largest(tiny_pair):
    windows = some_windows()
    worst = WorstTokens(3)
    options = ComparisonOptions(worst=worst)
    model, reference = tiny_pair
    parts = compare_windows(
        WindowScorer(model, chunk_size=4),
        LiveReference(WindowScorer(reference, chunk_size=4), VOCAB),
        windows,
        VOCAB,
        options=options,
    )
    values = np.sort(TokenDivergences.concatenate(parts).kl_ref_model)[::-1][:3]
    records = worst.records(make_tokenizer(WORDS), [])
    np.testing.assert_allclose([r["kl_ref_model"] for r in records], values)
    assert len(records[0]["model_top"]) == 3
    assert len(records[0]["reference_top"]) == 3


# End to end: run_kl and the command ---------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kl-models")
    tokenizer = make_tokenizer(WORDS)
    other = make_tokenizer([*WORDS[:4], "other", *WORDS[5:]])
    dirs = {
        "a": save_model_dir(root / "a", make_tiny_llama(VOCAB, seed=0), tokenizer),
        "a-copy": save_model_dir(root / "a-copy", make_tiny_llama(VOCAB, seed=0), tokenizer),
        "b": save_model_dir(root / "b", make_tiny_llama(VOCAB, seed=1), tokenizer),
        "other": save_model_dir(root / "other", make_tiny_llama(VOCAB, seed=1), other),
    }
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS, size=n))} for n in (40, 25, 60)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dirs["data"] = data
    return dirs


def kl_config(dirs, model="b", reference="a", **options) -> KLConfig:
    options.setdefault("window_size", 16)
    options.setdefault("progress", False)
    options.setdefault("threads", 1)
    return KLConfig(
        model=str(dirs[model]), reference=str(dirs[reference]), data=str(dirs["data"]), **options
    )


def test_run_kl_results_layout(model_dirs, tmp_path):
    output = tmp_path / "out"
    results = run_kl(kl_config(model_dirs, output=str(output)))
    metrics = results["metrics"]
    assert set(metrics) >= METRIC_KEYS
    for name in ("kl_model_ref", "kl_ref_model"):
        assert set(metrics[name]) >= LADDER_KEYS
        assert metrics[name]["estimate"] == "exact"
    assert set(metrics["delta_p"]) >= {"mean", "rms"}
    assert 0 <= metrics["top1_agreement"] <= 1
    assert metrics["num_tokens"] == 40 + 25 + 60
    assert results["command"] == "kl"
    assert results["vocabulary"]["compared_size"] == VOCAB
    assert len(results["worst_tokens"]) == 10

    stored = json.loads((output / "results.json").read_text())
    assert stored["metrics"] == metrics
    rows = [json.loads(line) for line in (output / "documents.jsonl").read_text().splitlines()]
    assert [row["num_tokens"] for row in rows] == [40, 25, 60]
    assert rows[0]["metrics"]["kl_model_ref"]["mean"] > 0


def test_run_kl_copies_give_zero(model_dirs):
    results = run_kl(kl_config(model_dirs, model="a-copy", batch_size=2))
    metrics = results["metrics"]
    assert metrics["kl_model_ref"]["mean"] == 0
    assert metrics["kl_ref_model"]["mean"] == 0
    assert metrics["kl_ref_model"]["max"] == 0
    assert metrics["top1_agreement"] == 1.0
    assert metrics["log_ppl_ratio"] == 0
    assert results["worst_tokens"] == []


def test_run_kl_rejects_mismatched_tokenizer(model_dirs):
    with pytest.raises(VocabularyError, match="differ at id 7"):
        run_kl(kl_config(model_dirs, model="other"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reference": None}, "no reference given"),
        ({"resume": True}, "does not support --resume"),
        ({"cache_format": "compact"}, "apply to --save-reference"),
        ({"worst_tokens": -1}, "invalid --worst-tokens -1: must be at least 0"),
        ({"padding_side": "middle"}, "invalid --padding-side 'middle'"),
        ({"reference_dtype": "int8"}, "invalid --reference-dtype 'int8'"),
        ({"batch_size": 0}, "invalid --batch-size 0"),
    ],
)
def test_run_kl_invalid_options(model_dirs, options, message):
    # Each case is an option a config file could set without the command line's checks.
    config = kl_config(model_dirs)
    for key, value in options.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=message):
        run_kl(config)


def run_command(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmeval", "kl", "--threads", "1", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=300,
    )


def test_command_prints_json(model_dirs, tmp_path):
    result = run_command(
        "--model", str(model_dirs["b"]), "--reference", str(model_dirs["a"]),
        "--data", str(model_dirs["data"]), "--window-size", "16", "--json", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert set(results["metrics"]) >= METRIC_KEYS
    assert results["metrics"]["kl_model_ref"]["mean"] > 0


def test_command_prints_table_and_rejects_tokenizer(model_dirs, tmp_path):
    table = run_command(
        "--model", str(model_dirs["a-copy"]), "--reference", str(model_dirs["a"]),
        "--data", str(model_dirs["data"]), "--window-size", "16", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "KL(model || reference)  mean 0 " in table.stdout
    assert "top-1 agreement" in table.stdout

    refused = run_command(
        "--model", str(model_dirs["other"]), "--reference", str(model_dirs["a"]),
        "--data", str(model_dirs["data"]), "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "lmeval: error: the tokenizers differ at id 7" in refused.stderr


def test_config_file_sets_options(model_dirs, tmp_path, capsys):
    config = tmp_path / "kl.yaml"
    config.write_text(
        f"model: {model_dirs['b']}\nreference: {model_dirs['a']}\n"
        f"data: {model_dirs['data']}\nwindow-size: 16\nthreads: 1\nworst_tokens: 2\n"
    )
    assert main(["kl", "--config", str(config), "--json", "--no-progress", "-q"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["protocol"]["window_size"] == 16
    assert len(results["worst_tokens"]) == 2


def test_config_file_unknown_key_rejected(tmp_path, capsys):
    config = tmp_path / "kl.yaml"
    config.write_text("reference: a\nrefrence-dtype: float32\nworst-tokens: many\n")
    assert main(["kl", "--config", str(config), "-q"]) == 2
    error = capsys.readouterr().err
    assert "unknown key 'refrence-dtype'" in error
    assert "worst-tokens must be an integer" in error


def test_several_invalid_options_reported_together(model_dirs):
    config = kl_config(model_dirs, resume=True, threads=0)
    with pytest.raises(ConfigError, match="does not support --resume.*; invalid --threads 0"):
        run_kl(config)


def test_output_directory_must_be_new(model_dirs, tmp_path):
    run_kl(kl_config(model_dirs, output=str(tmp_path)))
    with pytest.raises(ConfigError, match="already holds the results of a run"):
        run_kl(kl_config(model_dirs, output=str(tmp_path)))
