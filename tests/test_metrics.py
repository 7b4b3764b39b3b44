"""Metric functions against values computed by hand and by reference implementations."""

import math

import numpy as np
import pytest
import torch

from lmeval import metrics


def test_cross_entropy_matches_torch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=generator)
    targets = torch.randint(0, 11, (5, 7), generator=generator)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), targets.reshape(-1), reduction="none"
    ).reshape(5, 7)
    torch.testing.assert_close(metrics.cross_entropy(logits, targets), expected)


def test_cross_entropy_matches_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 9))
    targets = rng.integers(0, 9, size=6)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -log_softmax[np.arange(6), targets]
    actual = metrics.cross_entropy(torch.tensor(logits), torch.tensor(targets))
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5)


def test_cross_entropy_half_precision_computed_in_float32():
    logits = torch.tensor([[20.0, 0.0, -5.0]], dtype=torch.bfloat16)
    result = metrics.cross_entropy(logits, torch.tensor([1]))
    assert result.dtype == torch.float32
    expected = torch.logsumexp(logits.float(), -1) - 0.0
    torch.testing.assert_close(result, expected)


def test_cross_entropy_of_probability_p_is_minus_log_p():
    p = 0.3
    logprobs = torch.log(torch.tensor([[p, 0.5, 0.2]]))
    assert metrics.cross_entropy(logprobs, torch.tensor([0])).item() == pytest.approx(-math.log(p))


def test_uniform_cross_entropy_is_log_vocab():
    result = metrics.cross_entropy(torch.zeros(3, 50), torch.tensor([0, 7, 49]))
    torch.testing.assert_close(result, torch.full((3,), math.log(50)))


def test_entropy_of_fair_coin_is_log_two():
    logprobs = torch.log(torch.tensor([0.5, 0.5]))
    assert metrics.entropy(logprobs).item() == pytest.approx(math.log(2))


def test_entropy_with_zero_probability_is_finite():
    logprobs = torch.tensor([0.0, -math.inf, -math.inf])
    assert metrics.entropy(logprobs).item() == 0.0


def test_binary_cross_entropy_of_half_is_log_two():
    assert metrics.binary_cross_entropy(1.0, 0.5) == pytest.approx(math.log(2))


def test_binary_cross_entropy_clipped_at_zero_probability():
    value = metrics.binary_cross_entropy(1.0, 0.0)
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-12))


def test_perplexity_and_bits_per_byte_by_hand():
    assert metrics.perplexity(math.log(17.0)) == pytest.approx(17.0)
    assert metrics.bits_per_byte(2 * math.log(2), 2) == pytest.approx(1.0)


def test_ratio_interval_token_weighted():
    # Two documents: 10 nats over 5 tokens and 2 nats over 1 token.
    interval = metrics.ratio_interval([10.0, 2.0], [5, 1])
    assert interval.value == pytest.approx(12.0 / 6.0)
    # A mean of per-document means would give (2 + 2) / 2 = 2 too, so check variance:
    # residuals are 10 - 2*5 = 0 and 2 - 2*1 = 0.
    assert interval.stderr == pytest.approx(0.0)


def test_ratio_interval_delta_method_by_hand():
    y, x = [3.0, 1.0, 2.0], [1.0, 1.0, 2.0]
    ratio = 6.0 / 4.0
    residuals = [3 - ratio, 1 - ratio, 2 - 2 * ratio]
    variance = sum(r * r for r in residuals) / (3 * 2 * (4 / 3) ** 2)
    interval = metrics.ratio_interval(y, x)
    assert interval.value == pytest.approx(ratio)
    assert interval.stderr == pytest.approx(math.sqrt(variance))
    assert interval.low == pytest.approx(ratio - metrics.Z_95 * math.sqrt(variance))


def test_ratio_interval_single_unit_has_no_stderr():
    assert metrics.ratio_interval([3.0], [2.0]).stderr is None


def test_mean_interval_from_sums_matches_numpy():
    values = np.array([0.5, 1.5, 2.0, 4.0])
    interval = metrics.mean_interval(values.sum(), (values**2).sum(), len(values))
    assert interval.value == pytest.approx(values.mean())
    assert interval.stderr == pytest.approx(values.std(ddof=1) / 2.0)


def test_interval_mapped_through_exp():
    interval = metrics.Interval(1.0, 0.1, 0.8, 1.2).mapped(math.exp)
    assert interval.value == pytest.approx(math.e)
    assert interval.low == pytest.approx(math.exp(0.8))
    assert interval.high == pytest.approx(math.exp(1.2))
