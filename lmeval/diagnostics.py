"""Diagnostics of a perplexity run: where the loss sits and whether confidence is calibrated.

:func:`compute_diagnostics` builds the ``diagnostics`` object of a ppl results.json
from the per-token arrays of scored documents. Every part stays small whatever the
corpus size: positions are bucketed, calibration uses a fixed number of bins, and only
a few dozen tokens and documents are listed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from lmeval.perplexity import DocumentResult

NUM_CALIBRATION_BINS = 20
#: Upper bound on the number of position buckets; fewer when the window is small.
MAX_POSITION_BUCKETS = 48
NUM_HIGHEST_LOSS_TOKENS = 40
NUM_WORST_DOCUMENTS = 10
#: Tokens of decoded context stored before each highest-loss token.
CONTEXT_TOKENS = 16
DOCUMENT_PERCENTILES = {"p10": 10, "p25": 25, "median": 50, "p75": 75, "p90": 90}


def compute_diagnostics(documents: Sequence[DocumentResult], tokenizer, window_size: int) -> dict:
    """Return the ``diagnostics`` object of results.json.

    Only documents that carry per-token arrays count: rows read back from
    documents.jsonl by a resumed run have none, so ``num_tokens`` here may be below
    the run's ``metrics.num_tokens``.
    """
    scored = [d for d in documents if d.skipped is None and len(d.token_nll) == d.num_tokens]
    if not scored:
        return {"num_tokens": 0, "note": "no document with per-token values was scored"}
    token_nll = np.concatenate([d.token_nll for d in scored])
    correct = np.concatenate([d.correct for d in scored])
    confidence = np.concatenate([d.top1_prob for d in scored]).astype(np.float64)
    window_position = np.concatenate([d.window_position for d in scored])
    calibration = calibration_bins(confidence, correct, NUM_CALIBRATION_BINS)
    return {
        "num_tokens": int(len(token_nll)),
        "num_documents": len(scored),
        "nll_by_window_position": nll_by_position(window_position, token_nll, correct, window_size),
        "calibration": calibration,
        "documents": document_summary(scored),
        "highest_loss_tokens": highest_loss_tokens(scored, tokenizer),
        "definitions": {
            "window_position": "index of the predicting input within its window; the "
            "model saw window_position + 1 tokens, the prefix token included",
            "confidence": "probability of the model's top-1 token",
            "ece": "expected calibration error: sum over bins of (tokens in bin / "
            "tokens) x |accuracy - mean confidence|, equal-width confidence bins",
        },
    }


def position_bucket_edges(window_size: int, max_buckets: int = MAX_POSITION_BUCKETS) -> list[int]:
    """Return bucket edges over window positions ``0 .. window_size - 1``.

    Edges grow geometrically, so the first positions, where the loss changes fastest,
    get buckets of one position and the tail of an 8192-token window gets wide ones.
    Bucket ``i`` is ``edges[i] <= position < edges[i + 1]``.
    """
    if window_size <= max_buckets:
        return list(range(window_size + 1))
    geometric = np.geomspace(1, window_size, max_buckets)
    return sorted({0, *(int(round(edge)) for edge in geometric), window_size})


def nll_by_position(
    window_position: np.ndarray, token_nll: np.ndarray, correct: np.ndarray, window_size: int
) -> list[dict]:
    """Return mean NLL, accuracy and token count per window-position bucket."""
    edges = position_bucket_edges(window_size)
    # Positions past the window cannot occur; clip so a bad input cannot index past the end.
    bucket = np.clip(np.searchsorted(edges, window_position, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(bucket, minlength=len(edges) - 1)
    sums = np.bincount(bucket, weights=token_nll, minlength=len(edges) - 1)
    hits = np.bincount(bucket, weights=correct.astype(np.float64), minlength=len(edges) - 1)
    rows = []
    for index, count in enumerate(counts):
        if count == 0:
            continue
        rows.append(
            {
                "start": edges[index],
                "end": edges[index + 1],
                "num_tokens": int(count),
                "mean_nll": float(sums[index] / count),
                "accuracy": float(hits[index] / count),
            }
        )
    return rows


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> dict:
    """Bin top-1 confidence into ``num_bins`` equal-width bins and compute the ECE.

    A confidence of exactly 1 falls in the last bin. Empty bins are listed with
    ``num_tokens`` 0 and None for their means.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sums = np.bincount(bins, weights=correct, minlength=num_bins)
    rows = []
    ece = 0.0
    total = len(confidence)
    for index in range(num_bins):
        count = int(counts[index])
        row = {
            "low": index / num_bins,
            "high": (index + 1) / num_bins,
            "num_tokens": count,
            "mean_confidence": None,
            "accuracy": None,
        }
        if count:
            row["mean_confidence"] = float(confidence_sums[index] / count)
            row["accuracy"] = float(correct_sums[index] / count)
            ece += count / total * abs(row["accuracy"] - row["mean_confidence"])
        rows.append(row)
    return {
        "num_bins": num_bins,
        "bins": rows,
        "ece": ece,
        "mean_confidence": float(confidence.mean()),
        "accuracy": float(correct.mean()),
    }


def document_summary(documents: Sequence[DocumentResult]) -> dict:
    """Return percentiles of per-document perplexity and the highest-perplexity documents."""
    perplexity = np.array([_perplexity(d) for d in documents])
    levels = np.percentile(perplexity, list(DOCUMENT_PERCENTILES.values()))
    worst = sorted(documents, key=lambda d: -d.sum_nll / d.num_tokens)[:NUM_WORST_DOCUMENTS]
    return {
        "perplexity_percentiles": {
            name: float(level) for name, level in zip(DOCUMENT_PERCENTILES, levels, strict=True)
        },
        "worst": [
            {
                "index": d.index,
                "id": d.id,
                "title": d.title,
                "num_tokens": d.num_tokens,
                "mean_nll": d.sum_nll / d.num_tokens,
                "perplexity": _perplexity(d),
            }
            for d in worst
        ],
    }


def highest_loss_tokens(
    documents: Sequence[DocumentResult], tokenizer, count: int = NUM_HIGHEST_LOSS_TOKENS
) -> list[dict]:
    """Return the ``count`` tokens with the largest NLL, largest first, with their context.

    ``context`` is the decoded text of up to :data:`CONTEXT_TOKENS` scored tokens of
    the same document before the token, and ``position`` is the token's index in its
    document. For llama-cpp chunks both count only the chunk's scored tokens.
    """
    candidates: list[tuple[float, int, int]] = []
    for number, document in enumerate(documents):
        top = np.argsort(-document.token_nll, kind="stable")[:count]
        candidates.extend((float(document.token_nll[k]), number, int(k)) for k in top)
    records = []
    for nll, number, k in heapq.nlargest(count, candidates, key=lambda item: item[0]):
        document = documents[number]
        context_ids = document.target_ids[max(0, k - CONTEXT_TOKENS) : k].tolist()
        records.append(
            {
                "document": document.index,
                "document_id": document.id,
                "position": k,
                "window_position": int(document.window_position[k]),
                "token_id": int(document.target_ids[k]),
                "token": tokenizer.decode([int(document.target_ids[k])]),
                "context": tokenizer.decode(context_ids),
                "token_nll": nll,
                "top1_prob": float(document.top1_prob[k]),
                "correct": bool(document.correct[k]),
            }
        )
    return records


def _perplexity(document: DocumentResult) -> float:
    mean_nll = document.sum_nll / document.num_tokens
    return math.inf if mean_nll > 700 else math.exp(mean_nll)
