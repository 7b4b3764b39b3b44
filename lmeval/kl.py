"""Divergences between two next-token distributions, per position and over a corpus.

Shapes: C positions, V vocabulary entries shared by both models, K tokens of a top-K
summary. Inputs are ``logprobs`` (after log-softmax) in float32, ``[C, V]``. The
per-position terms are computed in float32 and summed over V in float64, so every
per-position result is a float64 tensor ``[C]``.

Each divergence is named after the distribution its expectation is taken under:

- ``kl_model_ref`` is KL(model ‖ reference) = Σ_v p_model(v) (log p_model(v) − log p_ref(v)),
  the KL penalty of RL fine-tuning (the policy is the model);
- ``kl_ref_model`` is KL(reference ‖ model) = Σ_v p_ref(v) (log p_ref(v) − log p_model(v)),
  the value llama.cpp's ``llama-perplexity --kl-divergence`` reports (its base model
  is the reference).

A token with p = 0 (logprob −inf) adds exactly 0 to a sum weighted by p, and a token
with p > 0 where q = 0 makes KL(P ‖ Q) +inf, so finite and −inf inputs never give NaN.
Rounding can make a sum slightly negative: the per-position functions return it as
computed, and :func:`summarize` clamps it to 0 and counts the clamps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from lmeval import metrics

NEG_INF = -math.inf
#: Tokens compared by ``top5_overlap``, and stored for the worst-token report.
TOP_TOKENS = 5
#: Percentiles reported for per-token KL, by result key.
KL_PERCENTILES = {"p1": 1, "p10": 10, "median": 50, "p90": 90, "p95": 95, "p99": 99, "p999": 99.9}
#: Per-token KL histogram: log10 of the first and last bin edges, and bins per decade.
LOG_HISTOGRAM_DECADES = (-8, 2)
LOG_HISTOGRAM_BINS_PER_DECADE = 4
#: Delta p histogram: log10 of the smallest and largest bin edge magnitudes.
DELTA_P_DECADES = (-6, 0)
#: Percentiles reported for Δp, which is signed.
DELTA_P_PERCENTILES = {
    "p1": 1,
    "p5": 5,
    "p10": 10,
    "p25": 25,
    "median": 50,
    "p75": 75,
    "p90": 90,
    "p95": 95,
    "p99": 99,
}

DIRECTIONS = {
    "kl_model_ref": "KL(model || reference) = sum_v p_model(v) (log p_model(v) - log p_ref(v))",
    "kl_ref_model": "KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v))",
}


# Per-position divergences --------------------------------------------------------


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Compute KL(P ‖ Q) = Σ_v p(v) (log p(v) − log q(v)) over the last axis, in nats.

    Args:
        p_logprobs: ``[..., V]`` log-probabilities of P; −inf marks p(v) = 0.
        q_logprobs: ``[..., V]`` log-probabilities of Q over the same tokens.

    Returns:
        ``[...]`` float64, not clamped: rounding can leave it a little below 0. It is
        +inf where some v has p(v) > 0 and q(v) = 0, even when exp(log p(v)) underflows.
    """
    p_logprobs = p_logprobs.float()
    q_logprobs = q_logprobs.float()
    p_is_zero = p_logprobs == NEG_INF
    only_q_is_zero = (q_logprobs == NEG_INF) & ~p_is_zero
    terms = p_logprobs.exp() * (p_logprobs - q_logprobs)
    # Both masks replace the NaN that 0 * inf and -inf - (-inf) would otherwise give.
    terms = terms.masked_fill(p_is_zero, 0.0).masked_fill(only_q_is_zero, math.inf)
    return terms.sum(-1, dtype=torch.float64)


def js_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Compute the Jensen–Shannon divergence ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q) / 2.

    It is symmetric, finite and at most ln 2 nats. Shapes as in :func:`kl_divergence`.
    """
    p_logprobs = p_logprobs.float()
    q_logprobs = q_logprobs.float()
    # Where p(v) = q(v), m(v) is p(v) exactly; logaddexp would round it, so that
    # identical distributions would not give exactly 0.
    m_logprobs = torch.where(
        p_logprobs == q_logprobs,
        p_logprobs,
        torch.logaddexp(p_logprobs, q_logprobs) - math.log(2.0),
    )
    return 0.5 * kl_divergence(p_logprobs, m_logprobs) + 0.5 * kl_divergence(q_logprobs, m_logprobs)


def total_variation(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Compute the total variation distance ½ Σ_v |p(v) − q(v)|, in [0, 1]."""
    difference = p_logprobs.float().exp() - q_logprobs.float().exp()
    return 0.5 * difference.abs().sum(-1, dtype=torch.float64)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Compute the entropy −Σ_v p(v) log p(v) in nats, with 0 log 0 = 0.

    Unlike :func:`lmeval.metrics.entropy`, the sum is float64.
    """
    logprobs = logprobs.float()
    terms = (logprobs.exp() * logprobs).masked_fill(logprobs == NEG_INF, 0.0)
    return -terms.sum(-1, dtype=torch.float64)


def round_logprobs(logprobs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``logprobs`` to ``dtype`` and renormalize them in float32.

    A reference stored in float16 is read back through this function, and the model's
    logprobs go through it too before they are compared with it. Identical inputs then
    stay identical, so KL(P ‖ P) is exactly 0.
    """
    return torch.log_softmax(logprobs.to(dtype).float(), dim=-1)


def top_token_ids(logprobs: torch.Tensor, k: int = TOP_TOKENS) -> torch.Tensor:
    """Return the ``[C, min(k, V)]`` ids of the most probable tokens, most probable first."""
    return logprobs.topk(min(k, logprobs.shape[-1]), dim=-1).indices


def top_overlap(model_top: torch.Tensor, ref_top: torch.Tensor) -> torch.Tensor:
    """Return ``|top_model ∩ top_ref| / k`` per position from two ``[C, k]`` id tensors."""
    shared = (model_top[:, :, None] == ref_top[:, None, :]).any(-1)  # [C, k]
    return shared.sum(-1, dtype=torch.float64) / model_top.shape[-1]


def sampled_kl_estimators(
    logprob_model: np.ndarray, logprob_ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the one-token estimators k1, k2, k3 of KL(model ‖ reference).

    With r = p_ref(x) / p_model(x) at a token x: k1 = −log r, k2 = (log r)² / 2 and
    k3 = (r − 1) − log r, as RL trainers log them. For x drawn from the model, k1 and
    k3 are unbiased estimates of KL(model ‖ reference). Here x is the true next token of
    the text, not a sample, so they are reported only to compare with the exact values.

    Args:
        logprob_model, logprob_ref: ``[N]`` log-probabilities of the tokens x.

    Returns:
        Three ``[N]`` float64 arrays.
    """
    logprob_model = np.asarray(logprob_model, dtype=np.float64)
    logprob_ref = np.asarray(logprob_ref, dtype=np.float64)
    both_zero = (logprob_model == NEG_INF) & (logprob_ref == NEG_INF)
    with np.errstate(invalid="ignore"):
        log_ratio = np.where(both_zero, 0.0, logprob_ref - logprob_model)
        k3 = np.where(log_ratio == math.inf, math.inf, np.expm1(log_ratio) - log_ratio)
    return -log_ratio, 0.5 * log_ratio**2, k3


# The reference side of a comparison ----------------------------------------------


@dataclass
class TopKSummary:
    """A distribution reduced to its K most probable tokens and one bucket for the rest.

    Attributes:
        ids: ``[C, K]`` token ids, most probable first.
        logprobs: ``[C, K]`` their log-probabilities.
        rest_logprob: ``[C]`` log of the total probability of all other tokens
            (−inf when the K tokens hold all of it).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest_logprob: torch.Tensor

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, k: int) -> TopKSummary:
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        return cls(top.indices, top.values, _rest_logprob(logprobs, top.indices))

    def cells(self) -> torch.Tensor:
        """Return the ``[C, K + 1]`` log-probabilities of the K tokens and the rest."""
        return torch.cat([self.logprobs.float(), self.rest_logprob.float()[:, None]], dim=-1)

    def coarsen(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Map another ``[C, V]`` distribution onto the same K + 1 cells, ``[C, K + 1]``."""
        top = logprobs.gather(-1, self.ids.long())
        rest = _rest_logprob(logprobs, self.ids.long())
        return torch.cat([top, rest[:, None]], dim=-1)


def _rest_logprob(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Return log Σ p(v) over the tokens v not in ``ids``, ``[C]``."""
    return torch.logsumexp(logprobs.scatter(-1, ids, NEG_INF), dim=-1)


@dataclass
class ReferenceChunk:
    """The reference's side of a comparison at C positions.

    Attributes:
        top_ids: ``[C, 5]`` ids of the reference's most probable tokens, most probable
            first (fewer columns when V < 5).
        top_logprobs: ``[C, 5]`` their log-probabilities.
        target_logprob: ``[C]`` float32 log-probability of the true next token.
        entropy: ``[C]`` float64 entropy of the reference distribution.
        logprobs: ``[C, V]`` the whole distribution, or None when only ``summary`` is
            known (a compact reference cache).
        summary: the top-K summary, or None.
        stored_as: the dtype ``logprobs`` were stored in. With float16 the model's
            distribution is rounded the same way before the comparison
            (see :func:`round_logprobs`).
        dropped_mass: ``[C]`` probability the reference put on output rows beyond the
            compared vocabulary, or None when it has no such rows.
    """

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    target_logprob: torch.Tensor
    entropy: torch.Tensor
    logprobs: torch.Tensor | None = None
    summary: TopKSummary | None = None
    stored_as: torch.dtype = torch.float32
    dropped_mass: torch.Tensor | None = None

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, targets: torch.Tensor) -> ReferenceChunk:
        """Describe the reference at C positions from its ``[C, V]`` logprobs."""
        top_ids = top_token_ids(logprobs)
        return cls(
            top_ids=top_ids,
            top_logprobs=logprobs.gather(-1, top_ids),
            target_logprob=logprobs.gather(-1, targets[:, None]).squeeze(-1),
            entropy=entropy(logprobs),
            logprobs=logprobs,
        )

    def to(self, device: torch.device) -> ReferenceChunk:
        """Move every tensor to ``device``."""
        summary = self.summary
        if summary is not None:
            summary = TopKSummary(
                summary.ids.to(device), summary.logprobs.to(device), summary.rest_logprob.to(device)
            )
        return ReferenceChunk(
            top_ids=self.top_ids.to(device),
            top_logprobs=self.top_logprobs.to(device),
            target_logprob=self.target_logprob.to(device),
            entropy=self.entropy.to(device),
            logprobs=None if self.logprobs is None else self.logprobs.to(device),
            summary=summary,
            stored_as=self.stored_as,
            dropped_mass=self.dropped_mass,
        )


# Per-token comparison --------------------------------------------------------------


@dataclass
class TokenDivergences:
    """The comparison of two models at N scored positions, as numpy arrays.

    Divergences are as computed, before clamping (see :func:`summarize`). With a
    compact reference they are the lower bounds of :func:`compare_chunk`.

    Attributes:
        kl_model_ref, kl_ref_model: ``[N]`` KL in both directions (see module docstring).
        js, tv: ``[N]`` Jensen–Shannon divergence and total variation distance.
        entropy_model, entropy_ref: ``[N]`` entropies.
        logprob_model, logprob_ref: ``[N]`` log-probabilities of the true next token.
        top1_agree: ``[N]`` bool, both models' most probable tokens are the same.
        top5_overlap: ``[N]`` fraction of the 5 most probable tokens they share.
        rest_mass_ref: ``[N]`` reference probability outside its top-K tokens, for a
            compact reference; None when the reference distribution is exact.
    """

    kl_model_ref: np.ndarray
    kl_ref_model: np.ndarray
    js: np.ndarray
    tv: np.ndarray
    entropy_model: np.ndarray
    entropy_ref: np.ndarray
    logprob_model: np.ndarray
    logprob_ref: np.ndarray
    top1_agree: np.ndarray
    top5_overlap: np.ndarray
    rest_mass_ref: np.ndarray | None = field(default=None)

    @property
    def num_tokens(self) -> int:
        return len(self.kl_model_ref)

    @classmethod
    def concatenate(cls, parts: Sequence[TokenDivergences]) -> TokenDivergences:
        """Join per-window or per-document parts, in order."""
        values = {}
        for item in fields(cls):
            arrays = [getattr(part, item.name) for part in parts]
            if any(array is None for array in arrays):
                values[item.name] = None
            else:
                values[item.name] = np.concatenate(arrays)
        return cls(**values)

    def slice(self, begin: int, end: int) -> TokenDivergences:
        """Return positions ``begin .. end - 1``."""
        values = {}
        for item in fields(self):
            array = getattr(self, item.name)
            values[item.name] = None if array is None else array[begin:end]
        return TokenDivergences(**values)

    def first_nan(self) -> tuple[str, int] | None:
        """Return the name and position of the first NaN value, or None if there is none."""
        for item in fields(self):
            array = getattr(self, item.name)
            if array is None or array.dtype == bool:
                continue
            bad = np.flatnonzero(np.isnan(array))
            if len(bad):
                return item.name, int(bad[0])
        return None


def compare_chunk(
    model_logprobs: torch.Tensor, targets: torch.Tensor, reference: ReferenceChunk
) -> TokenDivergences:
    """Compare the model with the reference at C positions.

    With the reference's whole distribution, KL, JS and TV are exact. With only its
    top-K summary, both distributions are first coarsened to the same K + 1 cells
    (the reference's top K tokens and one bucket for the rest). Coarsening never
    increases an f-divergence (the data-processing inequality), so KL in both
    directions, JS and TV are then lower bounds of the exact values.

    Args:
        model_logprobs: ``[C, V]`` float32 log-softmax of the model's logits.
        targets: ``[C]`` true next tokens.
        reference: the reference at the same positions.
    """
    model_distribution = model_logprobs
    if reference.stored_as != torch.float32:
        model_distribution = round_logprobs(model_logprobs, reference.stored_as)
    if reference.logprobs is not None:
        model_cells, ref_cells = model_distribution, reference.logprobs.float()
        rest_mass = None
    else:
        model_cells = reference.summary.coarsen(model_logprobs)
        ref_cells = reference.summary.cells()
        rest_mass = reference.summary.rest_logprob.double().exp()

    model_top = top_token_ids(model_logprobs, reference.top_ids.shape[-1])
    target_logprob = model_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    values = {
        "kl_model_ref": kl_divergence(model_cells, ref_cells),
        "kl_ref_model": kl_divergence(ref_cells, model_cells),
        "js": js_divergence(model_cells, ref_cells),
        "tv": total_variation(model_cells, ref_cells),
        "entropy_model": entropy(model_logprobs),
        "entropy_ref": reference.entropy.double(),
        "logprob_model": target_logprob.double(),
        "logprob_ref": reference.target_logprob.double(),
        "top1_agree": model_top[:, 0] == reference.top_ids[:, 0],
        "top5_overlap": top_overlap(model_top, reference.top_ids),
        "rest_mass_ref": rest_mass,
    }
    return TokenDivergences(
        **{name: None if value is None else value.cpu().numpy() for name, value in values.items()}
    )


# Statistics over tokens ------------------------------------------------------------


def summarize(
    documents: Sequence[TokenDivergences], *, documents_as_units: bool, estimate: str
) -> dict:
    """Aggregate per-token comparisons into the ``metrics`` object of a kl results.json.

    Args:
        documents: one part per document, each with at least one token.
        documents_as_units: estimate standard errors with documents as sampling units
            (the delta method for a ratio, as for perplexity), else from i.i.d. tokens.
        estimate: "exact" or "lower bound", written beside every divergence.

    Returns:
        Plain floats, with inf where a divergence is infinite. Divergences are clamped
        at 0 first; ``num_clamped`` counts the clamped values and ``min_before_clamp``
        is the lowest value before clamping.
    """
    every = TokenDivergences.concatenate(documents)
    counts = [part.num_tokens for part in documents]
    result: dict = {}
    for name in DIRECTIONS:
        result[name] = _divergence_summary(name, documents, counts, documents_as_units, estimate)

    for name in ("js", "tv"):
        values = [np.maximum(getattr(part, name), 0.0) for part in documents]
        result[name], result[f"{name}_stderr"] = _mean_and_stderr(
            values, counts, documents_as_units
        )
    agree = [part.top1_agree.astype(np.float64) for part in documents]
    result["top1_agreement"], result["top1_agreement_stderr"] = _mean_and_stderr(
        agree, counts, documents_as_units
    )
    result["top5_overlap"] = float(every.top5_overlap.mean())
    result["delta_p"] = _delta_p_summary(documents, counts, documents_as_units)
    result |= _perplexity_summary(documents, counts, documents_as_units)
    k1, k2, k3 = sampled_kl_estimators(every.logprob_model, every.logprob_ref)
    result |= {"k1": float(k1.mean()), "k2": float(k2.mean()), "k3": float(k3.mean())}
    result["entropy_model"] = float(every.entropy_model.mean())
    result["entropy_ref"] = float(every.entropy_ref.mean())
    if every.rest_mass_ref is not None:
        result["reference_rest_mass"] = {
            "mean": float(every.rest_mass_ref.mean()),
            "max": float(every.rest_mass_ref.max()),
        }
    result["num_tokens"] = every.num_tokens
    return result


def _divergence_summary(
    name: str,
    documents: Sequence[TokenDivergences],
    counts: Sequence[int],
    documents_as_units: bool,
    estimate: str,
) -> dict:
    raw = np.concatenate([getattr(part, name) for part in documents])
    clamped = [np.maximum(getattr(part, name), 0.0) for part in documents]
    mean, stderr = _mean_and_stderr(clamped, counts, documents_as_units)
    values = np.maximum(raw, 0.0)
    summary = {"mean": mean, "stderr": stderr}
    summary |= _percentiles(values, KL_PERCENTILES)
    summary |= {"min": float(values.min()), "max": float(values.max())}
    summary["histogram"] = log_histogram(values)
    summary |= {
        "num_clamped": int((raw < 0).sum()),
        "min_before_clamp": min(0.0, float(raw.min())),
        "direction": DIRECTIONS[name],
        "reduction": "mean over scored tokens; percentiles, min and max of per-token values",
        "estimate": estimate,
    }
    return summary


def _delta_p_summary(
    documents: Sequence[TokenDivergences], counts: Sequence[int], documents_as_units: bool
) -> dict:
    parts = [np.exp(part.logprob_model) - np.exp(part.logprob_ref) for part in documents]
    values = np.concatenate(parts)
    mean, stderr = _mean_and_stderr(parts, counts, documents_as_units)
    summary = {"mean": mean, "stderr": stderr, "rms": float(np.sqrt(np.mean(values**2)))}
    summary |= {"min": float(values.min())}
    summary |= _percentiles(values, DELTA_P_PERCENTILES)
    summary |= {"max": float(values.max())}
    summary["histogram"] = signed_log_histogram(values)
    return summary


def log_histogram(values: np.ndarray) -> dict:
    """Count non-negative per-token values in log-spaced bins.

    Bin k contains values in ``[edges[k], edges[k+1])``. ``below`` counts values under the
    first edge (exact zeros included) and ``above`` those at or over the last edge
    (infinities included), so the counts add up to ``len(values)``.
    """
    edges = np.logspace(
        LOG_HISTOGRAM_DECADES[0],
        LOG_HISTOGRAM_DECADES[1],
        (LOG_HISTOGRAM_DECADES[1] - LOG_HISTOGRAM_DECADES[0]) * LOG_HISTOGRAM_BINS_PER_DECADE + 1,
    )
    return _histogram(values, edges)


def signed_log_histogram(values: np.ndarray) -> dict:
    """Count values in [-1, 1] in bins log-spaced in magnitude on either side of zero.

    The edges run from -1 to -1e-6 and from 1e-6 to 1, so the bin in the middle holds
    values within 1e-6 of zero. 1 itself falls in the last bin; see :func:`log_histogram`.
    """
    low, high = DELTA_P_DECADES
    magnitudes = np.logspace(low, high, (high - low) * LOG_HISTOGRAM_BINS_PER_DECADE + 1)
    edges = np.concatenate([-magnitudes[::-1], magnitudes])
    histogram = _histogram(values, edges)
    # The top edge of the closed range [-1, 1] belongs to the last bin.
    at_top = int((values == edges[-1]).sum())
    histogram["counts"][-1] += at_top
    histogram["above"] -= at_top
    return histogram


def _histogram(values: np.ndarray, edges: np.ndarray) -> dict:
    positions = np.searchsorted(edges, values, side="right")
    counts = np.bincount(positions, minlength=len(edges) + 1)
    return {
        "edges": [float(edge) for edge in edges],
        "counts": [int(count) for count in counts[1:-1]],
        "below": int(counts[0]),
        "above": int(counts[-1]),
    }


def _perplexity_summary(
    documents: Sequence[TokenDivergences], counts: Sequence[int], documents_as_units: bool
) -> dict:
    every = TokenDivergences.concatenate(documents)
    mean_nll_model = float(-every.logprob_model.mean())
    mean_nll_ref = float(-every.logprob_ref.mean())
    # ln(PPL_model / PPL_ref) is the mean of nll_model - nll_ref = log r per token.
    log_ratios = [part.logprob_ref - part.logprob_model for part in documents]
    log_ratio, log_ratio_stderr = _mean_and_stderr(log_ratios, counts, documents_as_units)
    return {
        "perplexity_model": _exp(mean_nll_model),
        "perplexity_ref": _exp(mean_nll_ref),
        "log_ppl_ratio": log_ratio,
        "log_ppl_ratio_stderr": log_ratio_stderr,
        "mean_nll_model": mean_nll_model,
        "mean_nll_ref": mean_nll_ref,
        "nll_correlation": _correlation(-every.logprob_model, -every.logprob_ref),
    }


def _mean_and_stderr(
    parts: Sequence[np.ndarray], counts: Sequence[int], documents_as_units: bool
) -> tuple[float, float | None]:
    """Return the token-weighted mean of per-token values and its standard error."""
    values = np.concatenate(parts)
    if not np.isfinite(values).all():
        return float(values.mean()), None
    if documents_as_units and len(parts) >= 2:
        sums = [float(part.sum()) for part in parts]
        interval = metrics.ratio_interval(sums, counts)
    else:
        interval = metrics.mean_interval(float(values.sum()), float((values**2).sum()), len(values))
    return interval.value, interval.stderr


def _percentiles(values: np.ndarray, percentiles: dict[str, float]) -> dict[str, float]:
    with np.errstate(invalid="ignore"):
        levels = np.percentile(values, list(percentiles.values()))
    # Interpolating between two infinite values gives inf - inf = NaN.
    levels = np.where(np.isnan(levels), math.inf, levels)
    return {name: float(level) for name, level in zip(percentiles, levels, strict=True)}


def _exp(value: float) -> float:
    return math.inf if value > 700 else math.exp(value)


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])
