"""Loss metrics and their aggregation: pure functions, no model and no I/O.

Conventions: ``logits`` are scores before softmax; ``logprobs`` are after
log-softmax; ``token_nll`` is the per-token negative log-likelihood (>= 0, in nats);
``sum_nll`` and ``num_tokens`` are summed across windows and documents and divided
once at the end. Shapes: ``[..., V]`` over a vocabulary of V entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# Tensor methods alone are used here, so importing this module (as ``lmeval compare``
# does) does not load torch.
if TYPE_CHECKING:
    import torch

#: Two-sided 95% normal quantile.
Z_95 = 1.959963984540054


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the per-position NLL of ``targets`` under softmax(``logits``).

    This is the cross-entropy against the one-hot target distribution, computed
    from log-softmax in float32 whatever the input dtype.

    Args:
        logits: ``[..., V]`` scores.
        targets: ``[...]`` integer token ids.

    Returns:
        ``[...]`` float32 NLL, ``logsumexp(logits) - logits[target]``.
    """
    logits = logits.float()
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logits.logsumexp(dim=-1) - target_logits


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Return the entropy ``-sum p log p`` over the last axis, with 0 log 0 = 0.

    Args:
        logprobs: ``[..., V]`` log-probabilities (``-inf`` allowed).
    """
    logprobs = logprobs.float()
    # exp(-inf) * -inf is NaN, and masked to the limit 0 log 0 = 0.
    terms = (logprobs.exp() * logprobs).masked_fill(logprobs == -math.inf, 0.0)
    return -terms.sum(-1)


def binary_cross_entropy(
    target: float | np.ndarray, prob: float | np.ndarray, eps: float = 1e-12
) -> float | np.ndarray:
    """Return ``-(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``.

    The clipping keeps a confident wrong prediction finite instead of infinite.
    """
    prob = np.clip(prob, eps, 1.0 - eps)
    return -(target * np.log(prob) + (1.0 - target) * np.log1p(-prob))


def perplexity(mean_nll: float) -> float:
    """Return ``exp(mean_nll)``; the mean NLL is in nats."""
    return math.exp(mean_nll)


def bits_per_byte(sum_nll: float, num_bytes: int) -> float:
    """Return the NLL in bits per UTF-8 byte: ``sum_nll / (num_bytes * ln 2)``."""
    return sum_nll / (num_bytes * math.log(2))


@dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and two-sided 95% interval."""

    value: float
    stderr: float | None
    low: float | None
    high: float | None

    def mapped(self, function) -> Interval:
        """Apply a monotone increasing ``function`` to the value and the bounds."""
        if self.low is None or self.high is None:
            return Interval(function(self.value), None, None, None)
        return Interval(function(self.value), None, function(self.low), function(self.high))

    def clipped(self, minimum: float, maximum: float = math.inf) -> Interval:
        """Clip the bounds to the range that the quantity can take.

        A normal interval can leave that range, for example the interval of an accuracy
        near 0 or 1 measured on a few tokens.
        """
        if self.low is None or self.high is None:
            return self
        low = min(max(self.low, minimum), maximum)
        high = min(max(self.high, minimum), maximum)
        return Interval(self.value, self.stderr, low, high)


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float]) -> Interval:
    """Estimate ``sum(numerators) / sum(denominators)`` with a delta-method interval.

    Each pair is one sampling unit (a document): the ratio estimator's variance is
    ``sum((y_i - R x_i)^2) / (n (n - 1) mean(x)^2)`` over n units. With fewer than two
    units the standard error is unknown and returned as None.
    """
    y = np.asarray(numerators, dtype=np.float64)
    x = np.asarray(denominators, dtype=np.float64)
    ratio = float(y.sum() / x.sum())
    n = len(x)
    if n < 2:
        return Interval(ratio, None, None, None)
    residuals = y - ratio * x
    variance = float((residuals**2).sum() / (n * (n - 1) * x.mean() ** 2))
    return _normal_interval(ratio, math.sqrt(variance))


def paired_ratio_difference(
    numerators_a: Sequence[float],
    denominators_a: Sequence[float],
    numerators_b: Sequence[float],
    denominators_b: Sequence[float],
) -> tuple[float, float | None]:
    """Return ``R_b - R_a`` for two ratio estimates over the same units, and its stderr.

    ``R = sum(numerators) / sum(denominators)`` for each run. Unit i of a and unit i of
    b are the same document, so the delta method works on the difference of each
    unit's linearised terms ``(y_i - R x_i) / mean(x)``, and what the units share
    cancels. With fewer than two units the standard error is None.
    """
    terms = []
    ratios = []
    for numerators, denominators in (
        (numerators_a, denominators_a),
        (numerators_b, denominators_b),
    ):
        y = np.asarray(numerators, dtype=np.float64)
        x = np.asarray(denominators, dtype=np.float64)
        ratio = float(y.sum() / x.sum())
        ratios.append(ratio)
        terms.append((y - ratio * x) / x.mean())
    difference = ratios[1] - ratios[0]
    n = len(terms[0])
    if n < 2:
        return difference, None
    variance = float(((terms[1] - terms[0]) ** 2).sum() / (n * (n - 1)))
    return difference, math.sqrt(variance)


def mean_interval(total: float, total_squared: float, count: int) -> Interval:
    """Estimate a mean from the sum and sum of squares of ``count`` i.i.d. values.

    The standard error is the sample standard deviation over ``sqrt(count)``.
    """
    mean = total / count
    if count < 2:
        return Interval(mean, None, None, None)
    variance = max(0.0, (total_squared - count * mean**2) / (count - 1))
    return _normal_interval(mean, math.sqrt(variance / count))


def wilson_interval(successes: int, trials: int) -> Interval:
    """Estimate a proportion with Wilson's 95% score interval, for i.i.d. trials.

    Unlike the normal interval, it keeps a positive width at 0 and at ``trials``
    successes and never leaves [0, 1]. The standard error is that of
    :func:`mean_interval` for 0/1 values, ``sqrt(p (1 - p) / (n - 1))``.
    """
    p = successes / trials
    z2 = Z_95**2
    center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half_width = Z_95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials**2))
    half_width /= 1 + z2 / trials
    stderr = math.sqrt(p * (1 - p) / (trials - 1)) if trials > 1 else None
    return Interval(p, stderr, max(0.0, center - half_width), min(1.0, center + half_width))


def _normal_interval(value: float, stderr: float) -> Interval:
    return Interval(value, stderr, value - Z_95 * stderr, value + Z_95 * stderr)
