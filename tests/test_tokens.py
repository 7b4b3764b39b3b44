"""tokens.parquet from ``lmeval ppl --save-tokens``: schema, readers and totals."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny import make_tiny_llama, make_tokenizer, save_model_dir

from lmeval.cli import main

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    tokenizer = make_tokenizer(WORDS)
    model_dir = save_model_dir(root / "model", make_tiny_llama(len(tokenizer)), tokenizer)
    rng = np.random.default_rng(0)
    paragraphs = [" ".join(rng.choice(WORDS, size=n)) for n in (3, 40, 17, 1, 9)]
    data = root / "data.txt"
    data.write_text("\n\n".join(paragraphs))
    output = root / "run"
    argv = ["ppl", "--model", str(model_dir), "--data", str(data), "--sample-by", "paragraph"]
    argv += ["--window-size", "16", "--output", str(output), "--save-tokens", "--no-progress"]
    assert main(argv) == 0
    return output


def test_tokens_rows_and_total_nll(run_dir):
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    table = pq.read_table(run_dir / "tokens.parquet")
    assert table.num_rows == metrics["num_tokens"]
    total = float(np.sum(table.column("token_nll").to_numpy()))
    assert total == pytest.approx(metrics["sum_nll"], rel=1e-12)
    assert int(table.column("correct").to_numpy().sum()) == metrics["num_correct"]


def test_tokens_columns(run_dir):
    frame = pq.read_table(run_dir / "tokens.parquet").to_pandas()
    expected = [
        "document_index",
        "document_id",
        "position",
        "window_position",
        "token_id",
        "token",
        "token_nll",
        "correct",
        "top1_prob",
        "entropy",
    ]
    assert list(frame.columns) == expected
    assert frame["entropy"].notna().all()
    assert (frame["window_position"] < 16).all()
    assert frame["top1_prob"].between(0, 1).all()
    # The one-word paragraph (index 3) is skipped: too short to score.
    assert sorted(frame["document_index"].unique()) == [0, 1, 2, 4]
    first = frame[frame["document_index"] == 1]
    assert first["position"].tolist() == list(range(40))
    assert set(frame["token"]) <= set(WORDS)


def test_tokens_read_by_pandas_and_datasets(run_dir, tmp_path):
    import datasets
    import pandas

    path = run_dir / "tokens.parquet"
    frame = pandas.read_parquet(path)
    dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path))
    assert len(dataset) == len(frame)
    assert dataset["token_nll"][:5] == pytest.approx(frame["token_nll"][:5].tolist())


def test_save_tokens_needs_output(tmp_path, capsys):
    assert main(["ppl", "--model", "x", "--save-tokens"]) == 2
    assert "--save-tokens needs --output" in capsys.readouterr().err
