"""Diagnostics of a ppl run: position buckets, calibration bins and highest-loss tokens."""

import math

import numpy as np
import pytest
from handset import bigram_llama, cycle_table
from tiny import make_tokenizer

from lmeval.data import Corpus, Document
from lmeval.diagnostics import (
    calibration_bins,
    compute_diagnostics,
    nll_by_position,
    position_bucket_edges,
)
from lmeval.models import LoadedModel
from lmeval.perplexity import ScoringSettings, resolve_settings, score_corpus

WORDS = [f"w{i}" for i in range(13)]  # ids 3..15 after <unk>, <s>, </s>
VOCAB = 3 + len(WORDS)


def score_bigram(p: float, texts: list[str], window_size: int):
    tokenizer = make_tokenizer(WORDS)
    model = bigram_llama(cycle_table(VOCAB, p))
    loaded = LoadedModel(model, tokenizer, {"spec": "bigram"}, model.config.max_position_embeddings)
    corpus = Corpus([Document(str(i), t, t) for i, t in enumerate(texts)], {"task": None})
    settings = resolve_settings(ScoringSettings(window_size=window_size), loaded)
    return score_corpus(loaded, corpus, settings), tokenizer


def test_calibration_bins_on_bigram_model():
    # Under cycle_table every row puts p = 0.7 on the next id, so the top-1
    # confidence of every token is 0.7: all tokens fall in bin 14 of 20
    # ([0.70, 0.75)). The top-1 token is right where the text follows the cycle.
    p = 0.7
    # ids: w0=3 w1=4 ...; <s>=1 -> w1 (4) is off-cycle, 4->5 on, 5->6 on, 6->9 off,
    # 9->10 on, 10->3 off: 3 of 6 tokens are correct.
    text = " ".join(WORDS[i] for i in (1, 2, 3, 6, 7, 0))
    documents, tokenizer = score_bigram(p, [text], window_size=8)
    calibration = compute_diagnostics(documents, tokenizer, 8)["calibration"]
    filled = [row for row in calibration["bins"] if row["num_tokens"]]
    assert len(calibration["bins"]) == 20
    assert len(filled) == 1
    assert filled[0]["low"] == pytest.approx(0.70)
    assert filled[0]["num_tokens"] == 6
    assert filled[0]["mean_confidence"] == pytest.approx(p, rel=1e-5)
    assert filled[0]["accuracy"] == pytest.approx(0.5)
    assert calibration["ece"] == pytest.approx(abs(0.5 - p), rel=1e-5)


def test_calibration_bins_by_hand():
    confidence = np.array([0.02, 0.07, 0.5, 0.5, 1.0])
    correct = np.array([False, True, True, False, True])
    calibration = calibration_bins(confidence, correct, 10)
    counts = [row["num_tokens"] for row in calibration["bins"]]
    assert counts == [2, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert calibration["bins"][0]["mean_confidence"] == pytest.approx(0.045)
    assert calibration["bins"][0]["accuracy"] == pytest.approx(0.5)
    assert calibration["bins"][1]["accuracy"] is None
    # |0.5 - 0.045| * 2/5 + |0.5 - 0.5| * 2/5 + |1 - 1| * 1/5
    assert calibration["ece"] == pytest.approx(0.455 * 2 / 5)


def test_position_buckets_small_window_one_per_position():
    assert position_bucket_edges(5) == [0, 1, 2, 3, 4, 5]


def test_position_buckets_long_window_stay_few():
    edges = position_bucket_edges(8192)
    assert edges[:3] == [0, 1, 2]
    assert edges[-1] == 8192
    assert len(edges) - 1 <= 48
    assert edges == sorted(set(edges))


def test_nll_by_position_by_hand():
    positions = np.array([0, 1, 1, 3])
    token_nll = np.array([4.0, 2.0, 1.0, 0.5])
    correct = np.array([False, True, False, True])
    rows = nll_by_position(positions, token_nll, correct, 4)
    assert [(r["start"], r["num_tokens"]) for r in rows] == [(0, 1), (1, 2), (3, 1)]
    assert rows[1]["mean_nll"] == pytest.approx(1.5)
    assert rows[1]["accuracy"] == pytest.approx(0.5)


def test_window_positions_and_highest_loss_token():
    # The first token (w1 after <s>) is the only off-cycle one, so its NLL is largest.
    p = 0.9
    text = " ".join(WORDS[i] for i in (1, 2, 3, 4, 5))
    documents, tokenizer = score_bigram(p, [text], window_size=2)
    document = documents[0]
    # Rolling windows of 2 over <s> w1 .. w5: [<s> w1] scores w1 w2 at positions 0 1,
    # [w2 w3] scores w3 w4 at 0 1, and the last window [w3 w4] scores only w5 at 1.
    assert document.window_position.tolist() == [0, 1, 0, 1, 1]
    assert document.target_ids.tolist() == [4, 5, 6, 7, 8]
    worst = compute_diagnostics(documents, tokenizer, 2)["highest_loss_tokens"][0]
    assert worst["position"] == 0
    assert worst["token"] == "w1"
    assert worst["token_nll"] == pytest.approx(-math.log((1 - p) / (VOCAB - 1)), rel=1e-5)
    assert worst["context"] == ""
