"""WindowScorer on real tiny Llama models: closed-form values and equivalences."""

import math

import numpy as np
import pytest
import torch
from handset import bigram_llama, cycle_table, uniform_llama
from tiny import make_tiny_llama

from lmeval.errors import ScoringError
from lmeval.scoring import (
    CPU_BATCH_TOKENS,
    MAX_AUTO_BATCH_SIZE,
    WindowScorer,
    auto_batch_size,
    prefix_token_id,
)
from lmeval.windows import Window, rolling_windows, sliding_windows

VOCAB = 24


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_llama(VOCAB, max_positions=128, seed=0)


def random_tokens(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, size=length).tolist()


def total_nll(scores) -> float:
    return float(sum(s.token_nll.sum() for s in scores))


def test_uniform_model_perplexity_equals_vocab_size():
    model = uniform_llama(16)
    windows = rolling_windows(list(range(16)) * 3, prefix_token=0, window_size=10)
    scores = WindowScorer(model).score(windows)
    token_nll = np.concatenate([s.token_nll for s in scores])
    assert len(token_nll) == 48
    assert math.exp(token_nll.mean()) == pytest.approx(16.0, rel=1e-6)


def test_bigram_model_nll_is_minus_log_p():
    p = 0.8
    model = bigram_llama(cycle_table(8, p))
    tokens = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    windows = rolling_windows(tokens, prefix_token=0, window_size=4)
    token_nll = np.concatenate([s.token_nll for s in WindowScorer(model).score(windows)])
    # Every token follows its predecessor in the cycle, the first one the prefix 0.
    np.testing.assert_allclose(token_nll, -math.log(p), rtol=1e-5)


def test_bigram_wrong_tokens_get_off_cycle_probability():
    p = 0.6
    model = bigram_llama(cycle_table(5, p))
    tokens = [1, 3, 4]  # 0->1 on cycle, 1->3 off, 3->4 on
    token_nll = WindowScorer(model).score(rolling_windows(tokens, 0, 8))[0].token_nll
    expected = [-math.log(p), -math.log((1 - p) / 4), -math.log(p)]
    np.testing.assert_allclose(token_nll, expected, rtol=1e-5)


def test_top1_correct_flags():
    model = bigram_llama(cycle_table(5, 0.6))
    scores = WindowScorer(model).score(rolling_windows([1, 3, 4], 0, 8))[0]
    assert scores.correct.tolist() == [True, False, True]


def test_scorer_matches_model_loss(tiny_model):
    tokens = random_tokens(40, seed=1)
    ids = torch.tensor([tokens])
    expected = tiny_model(ids, labels=ids).loss.item()  # mean over tokens 1..T-1
    window = Window(tokens[:-1], tokens[1:], 0, 1)
    scores = WindowScorer(tiny_model).score([window])[0]
    assert scores.token_nll.mean() == pytest.approx(expected, rel=1e-5)


def test_chunked_equals_single_chunk(tiny_model):
    windows = rolling_windows(random_tokens(100, seed=2), 1, 32)
    chunked = WindowScorer(tiny_model, chunk_size=3).score(windows)
    plain = WindowScorer(tiny_model, chunk_size=10_000).score(windows)
    for a, b in zip(chunked, plain, strict=True):
        np.testing.assert_allclose(a.token_nll, b.token_nll, rtol=1e-6)
        assert (a.correct == b.correct).all()


def test_chunked_equals_full_logits_cross_entropy(tiny_model):
    tokens = random_tokens(30, seed=3)
    scores = WindowScorer(tiny_model, chunk_size=4).score(rolling_windows(tokens, 1, 64))
    ids = torch.tensor([[1, *tokens[:-1]]])
    logits = tiny_model(ids).logits[0]
    expected = torch.nn.functional.cross_entropy(
        logits.detach(), torch.tensor(tokens), reduction="none"
    )
    np.testing.assert_allclose(scores[0].token_nll, expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_size_does_not_change_sums(tiny_model, padding_side):
    documents = [random_tokens(n, seed=n) for n in (5, 17, 40, 63, 64, 90, 2, 33)]
    windows = [w for index, doc in enumerate(documents) for w in rolling_windows(doc, 1, 32, index)]
    one = WindowScorer(tiny_model, batch_size=1).score(windows)
    many = WindowScorer(tiny_model, batch_size=16, padding_side=padding_side).score(windows)
    assert total_nll(many) == pytest.approx(total_nll(one), rel=1e-6)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.token_nll, b.token_nll, rtol=1e-5, atol=1e-6)


def test_windowed_equals_full_pass_when_document_fits(tiny_model):
    tokens = random_tokens(50, seed=4)
    windowed = WindowScorer(tiny_model).score(rolling_windows(tokens, 1, 64))
    full = WindowScorer(tiny_model).score([Window([1, *tokens[:-1]], tokens, 0, 0)])
    np.testing.assert_allclose(windowed[0].token_nll, full[0].token_nll, rtol=1e-6)


def test_sliding_with_full_stride_equals_rolling(tiny_model):
    tokens = random_tokens(70, seed=5)
    rolling = WindowScorer(tiny_model).score(rolling_windows(tokens, 1, 16))
    sliding = WindowScorer(tiny_model).score(sliding_windows(tokens, 1, 16, 16))
    # With stride == window, sliding windows condition on nothing extra, so only
    # the first window agrees exactly; both score every token once.
    assert sum(len(s.token_nll) for s in sliding) == sum(len(s.token_nll) for s in rolling)
    np.testing.assert_allclose(sliding[0].token_nll, rolling[0].token_nll, rtol=1e-6)


def test_half_precision_model_scored_in_float32(tiny_model):
    model = make_tiny_llama(VOCAB, max_positions=128, seed=0).to(torch.bfloat16)
    scores = WindowScorer(model).score(rolling_windows(random_tokens(20, 6), 1, 32))
    assert scores[0].token_nll.dtype == np.float64
    assert np.isfinite(scores[0].token_nll).all()


def test_nan_weights_raise_scoring_error():
    model = make_tiny_llama(VOCAB, max_positions=128, seed=0)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    with pytest.raises(ScoringError, match="document 3 at token 0"):
        WindowScorer(model).score(rolling_windows([4, 5, 6], 1, 8, document=3))


def test_prefix_token_prefers_bos_then_eos():
    class Tokenizer:
        bos_token_id = None
        eos_token_id = 7

    assert prefix_token_id(Tokenizer()) == 7
    Tokenizer.bos_token_id = 3
    assert prefix_token_id(Tokenizer()) == 3


def test_prefix_token_missing_raises():
    class Tokenizer:
        bos_token_id = None
        eos_token_id = None

    with pytest.raises(ScoringError, match="neither a BOS nor an EOS"):
        prefix_token_id(Tokenizer())


def test_top1_prob_and_entropy_closed_form():
    p, vocab = 0.7, 6
    model = bigram_llama(cycle_table(vocab, p))
    scores = WindowScorer(model, with_entropy=True).score(rolling_windows([1, 2, 4], 0, 8))[0]
    rest = (1 - p) / (vocab - 1)
    expected_entropy = -p * math.log(p) - (vocab - 1) * rest * math.log(rest)
    np.testing.assert_allclose(scores.top1_prob, p, rtol=1e-5)
    np.testing.assert_allclose(scores.entropy, expected_entropy, rtol=1e-5)


def test_entropy_omitted_by_default():
    model = bigram_llama(cycle_table(6, 0.7))
    assert WindowScorer(model).score(rolling_windows([1, 2], 0, 8))[0].entropy is None


def test_auto_batch_on_cpu_aims_at_batch_tokens():
    model = make_tiny_llama(16, max_positions=4096, seed=0)
    assert auto_batch_size(model, 2048) == 1
    assert auto_batch_size(model, 512) == CPU_BATCH_TOKENS // 512
    assert auto_batch_size(model, 4096) == 1
    assert auto_batch_size(model, 1) == MAX_AUTO_BATCH_SIZE
