"""Properties that hold for every input, checked with hypothesis on generated cases.

Example counts are kept small (``FEW`` and ``MANY`` below) so that the module runs
in a few seconds. The windowing properties are cheap and get more examples.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import make_tiny_llama

from lmeval import metrics
from lmeval.perplexity import DocumentResult, corpus_metrics
from lmeval.scoring import WindowScorer
from lmeval.windows import (
    iter_scored_positions,
    llama_cpp_chunks,
    rolling_windows,
    sliding_windows,
)

FEW = settings(max_examples=40, deadline=None, database=None)
MANY = settings(max_examples=200, deadline=None, database=None)
VOCAB = 24
PREFIX = 1

logit_values = st.floats(min_value=-30, max_value=30, allow_nan=False, width=32)


@st.composite
def logits_and_target(draw):
    """A row of logits over 2 to 40 entries and a target index into it."""
    size = draw(st.integers(min_value=2, max_value=40))
    logits = draw(st.lists(logit_values, min_size=size, max_size=size))
    return torch.tensor(logits), draw(st.integers(min_value=0, max_value=size - 1))


@st.composite
def logits_and_distribution(draw):
    """A row of logits and a soft target distribution q over the same entries."""
    logits, _ = draw(logits_and_target())
    weights = draw(
        st.lists(
            st.floats(min_value=0, max_value=1, allow_nan=False),
            min_size=len(logits),
            max_size=len(logits),
        ).filter(lambda values: sum(values) > 1e-3)
    )
    q = torch.tensor(weights, dtype=torch.float64)
    return logits, q / q.sum()


@pytest.fixture(scope="module")
def scorer():
    return WindowScorer(make_tiny_llama(VOCAB, max_positions=64, seed=0), batch_size=4)


# --- loss values ----------------------------------------------------------------


@FEW
@given(logits_and_target())
def test_cross_entropy_nonnegative(case):
    logits, target = case
    assert metrics.cross_entropy(logits, torch.tensor(target)).item() >= 0


@FEW
@given(logits_and_distribution())
def test_cross_entropy_at_least_entropy(case):
    # Gibbs' inequality: H(q, p) = -sum q log p >= H(q), with equality only at p = q.
    logits, q = case
    targets = torch.arange(len(logits))
    token_nll = metrics.cross_entropy(logits.expand(len(logits), -1), targets).double()
    cross = float((q * token_nll).sum())
    entropy = float(metrics.entropy(q.log()))
    assert cross >= entropy - 1e-4 * (1 + abs(entropy))


@FEW
@given(st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=60))
def test_scorer_nll_nonnegative(scorer, tokens):
    windows = rolling_windows(tokens, PREFIX, window_size=16)
    token_nll = np.concatenate([s.token_nll for s in scorer.score(windows)])
    assert len(token_nll) == len(tokens)
    assert (token_nll >= 0).all()


document_nll = st.lists(
    st.floats(min_value=0, max_value=20, allow_nan=False), min_size=1, max_size=30
)


def document_result(index: int, token_nll: list[float], words: int, size: int) -> DocumentResult:
    values = np.asarray(token_nll, dtype=np.float64)
    return DocumentResult(
        index=index,
        id=str(index),
        title=None,
        num_tokens=len(values),
        num_words=words,
        num_bytes=size,
        sum_nll=float(values.sum()),
        sum_nll_squared=float((values**2).sum()),
    )


@FEW
@given(
    st.lists(
        st.tuples(document_nll, st.integers(1, 40), st.integers(1, 400)), min_size=1, max_size=8
    ),
    st.sampled_from(["rolling", "llama-cpp"]),
)
def test_perplexities_at_least_one(documents, protocol):
    results = [document_result(i, *document) for i, document in enumerate(documents)]
    values = corpus_metrics(results, protocol)
    assert values["mean_nll"] >= 0
    assert values["perplexity"] >= 1
    assert values["word_perplexity"] >= 1
    assert values["byte_perplexity"] >= 1
    assert values["bits_per_byte"] >= 0


# --- windows: every token scored exactly once ----------------------------------


def assert_scored_once(windows, tokens, window_size):
    counts = Counter(p for window in windows for p in iter_scored_positions(window))
    assert sorted(counts) == list(range(len(tokens)))
    assert set(counts.values()) <= {1}
    for window in windows:
        scored = window.target_ids[window.score_start :]
        begin = window.first_target
        assert scored == tokens[begin : begin + window.num_scored]
        assert len(window.input_ids) == len(window.target_ids) <= window_size
        # Inputs are the targets shifted by one: position i + 1 is fed target i.
        assert window.input_ids[1:] == window.target_ids[:-1]


lengths = st.integers(min_value=0, max_value=300)
window_sizes = st.integers(min_value=1, max_value=64)


@MANY
@given(lengths, window_sizes)
def test_rolling_covers_each_token_once(length, window_size):
    tokens = list(range(100, 100 + length))
    windows = rolling_windows(tokens, PREFIX, window_size)
    assert_scored_once(windows, tokens, window_size)
    assert all(window.input_ids[0] == PREFIX for window in windows[:1])


@MANY
@given(lengths, st.data())
def test_sliding_covers_each_token_once(length, data):
    window_size = data.draw(window_sizes)
    stride = data.draw(st.integers(min_value=1, max_value=window_size))
    tokens = list(range(100, 100 + length))
    windows = sliding_windows(tokens, PREFIX, window_size, stride)
    assert_scored_once(windows, tokens, window_size)
    for window in windows[1:]:
        assert window.score_start >= window_size - stride


@MANY
@given(
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=3, max_value=64),
    st.sampled_from([None, PREFIX]),
)
def test_llama_cpp_scores_second_halves_once(length, window_size, bos_token):
    stream = list(range(100, 100 + length))
    chunks = llama_cpp_chunks(stream, window_size, bos_token)
    counts = Counter(p for chunk in chunks for p in iter_scored_positions(chunk))
    expected = [
        begin + offset
        for begin in range(0, (length // window_size) * window_size, window_size)
        for offset in range(window_size // 2 + 1, window_size)
    ]
    assert sorted(counts) == expected
    assert set(counts.values()) <= {1}
    for index, chunk in enumerate(chunks):
        scored = chunk.target_ids[chunk.score_start :]
        first_input = stream[index * window_size] if bos_token is None else bos_token
        assert scored == stream[chunk.first_target : chunk.first_target + chunk.num_scored]
        assert chunk.input_ids[0] == first_input
