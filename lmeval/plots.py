"""Figures of the run report, each returned as PNG bytes.

The figures are drawn with matplotlib's ``Figure`` API, which renders with the Agg
canvas and never touches pyplot's global state or a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

DPI = 110


def png_bytes(figure: Figure) -> bytes:
    """Render ``figure`` to PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def nll_by_position(buckets: Sequence[dict], mean_nll: float) -> bytes:
    """Plot mean NLL per window-position bucket, with the bucket's token count."""
    figure = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = figure.subplots()
    starts = np.array([b["start"] for b in buckets])
    ends = np.array([b["end"] for b in buckets])
    centres = (starts + ends - 1) / 2
    values = [b["mean_nll"] for b in buckets]
    axes.step(centres, values, where="mid", color="tab:blue", marker="o", markersize=3)
    axes.axhline(mean_nll, color="gray", linestyle="--", linewidth=1, label="corpus mean NLL")
    if ends[-1] > 64:
        axes.set_xscale("symlog", linthresh=8)
        # Powers of 4 from 1, labelled as plain numbers, keep the ticks apart.
        ticks = [0, *(4**k for k in range(int(math.log(ends[-1], 4)) + 1))]
        axes.set_xticks(ticks, [f"{tick:,}" for tick in ticks])
        axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("position in window (tokens of context - 1)")
    axes.set_ylabel("mean NLL (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    # Token counts as faint bars on a hidden second y axis, drawn behind the line.
    counts = axes.twinx()
    counts.bar(centres, [b["num_tokens"] for b in buckets], width=ends - starts, alpha=0.12)
    counts.set_yticks([])
    axes.set_zorder(counts.get_zorder() + 1)
    axes.patch.set_visible(False)
    axes.set_title("Mean NLL by position within the window (bars: token counts)")
    return png_bytes(figure)


def document_perplexity(perplexities: Sequence[float], corpus_perplexity: float) -> bytes:
    """Plot a histogram of per-document perplexity on a log axis."""
    figure = Figure(figsize=(7.5, 3.4), layout="constrained")
    axes = figure.subplots()
    values = np.array([p for p in perplexities if math.isfinite(p) and p > 0])
    low, high = values.min(), values.max()
    if high <= low * 1.01:
        low, high = low / 1.1, high * 1.1
    bins = np.geomspace(low, high, min(40, max(5, len(values) // 2)) + 1)
    axes.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    axes.set_xscale("log")
    # Five plain-number ticks across the range, because a narrow range may hold no decade.
    ticks = np.geomspace(bins[0], bins[-1], 5)
    axes.set_xticks(ticks, [f"{tick:.3g}" for tick in ticks])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.axvline(corpus_perplexity, color="tab:red", linestyle="--", label="corpus perplexity")
    axes.set_xlabel("document perplexity (log scale)")
    axes.set_ylabel("documents")
    axes.legend()
    axes.grid(alpha=0.3)
    axes.set_title(f"Per-document perplexity ({len(values)} documents)")
    return png_bytes(figure)


def reliability_diagram(calibration: dict) -> bytes:
    """Plot accuracy against mean top-1 confidence per bin, with the bins' token counts."""
    figure = Figure(figsize=(7.5, 4.6), layout="constrained")
    diagram, counts = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = calibration["bins"]
    filled = [b for b in bins if b["num_tokens"]]
    width = 1 / calibration["num_bins"]
    diagram.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    diagram.bar(
        [b["low"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        color="tab:blue",
        alpha=0.7,
        edgecolor="white",
        label="accuracy",
    )
    diagram.plot(
        [b["mean_confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        color="tab:red",
        marker="o",
        markersize=3,
        linewidth=1,
        label="accuracy at mean confidence",
    )
    diagram.set_xlim(0, 1)
    diagram.set_ylim(0, 1)
    diagram.set_ylabel("top-1 accuracy")
    diagram.legend(loc="upper left")
    diagram.grid(alpha=0.3)
    diagram.set_title(f"Reliability diagram (ECE {calibration['ece']:.4f})")
    counts.bar(
        [b["low"] for b in bins],
        [b["num_tokens"] for b in bins],
        width=width,
        align="edge",
        color="tab:gray",
    )
    counts.set_yscale("symlog", linthresh=1)
    counts.set_xlabel("top-1 confidence")
    counts.set_ylabel("tokens")
    return png_bytes(figure)


def percentile_ladder(summaries: dict[str, dict], names: dict[str, str], title: str) -> bytes:
    """Plot percentile ladders (p1 .. max) of per-token values, on a log value axis."""
    figure = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = figure.subplots()
    drawn = False
    order = {name: position for position, name in enumerate(_LADDER_ORDER)}
    used = set()
    for key, label in names.items():
        ladder = _ladder(summaries.get(key) or {})
        positive = [(name, value) for name, value in ladder if value > 0 and math.isfinite(value)]
        if not positive:
            continue
        axes.plot(
            [order[name] for name, _ in positive],
            [value for _, value in positive],
            marker="o",
            label=label,
        )
        used.update(name for name, _ in positive)
        drawn = True
    ticks = [name for name in _LADDER_ORDER if name in used]
    axes.set_xticks([order[name] for name in ticks], ticks)
    if drawn:
        axes.set_yscale("log")
        axes.legend()
    axes.set_xlabel("percentile of per-token values")
    axes.set_ylabel("nats (log scale)")
    axes.grid(alpha=0.3, which="both")
    axes.set_title(title)
    return png_bytes(figure)


def kl_histogram(summaries: dict[str, dict], names: dict[str, str], title: str) -> bytes:
    """Plot stored log-binned histograms of per-token KL as step lines on a log axis.

    Tokens under the first edge (exact zeros included) and at or over the last edge
    are not drawn; the legend gives their counts.
    """
    figure = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = figure.subplots()
    for key, label in names.items():
        histogram = (summaries.get(key) or {}).get("histogram")
        if not histogram:
            continue
        edges = np.asarray(histogram["edges"])
        counts = np.asarray(histogram["counts"])
        axes.stairs(
            counts,
            edges,
            label=f"{label} ({histogram['below']:,} below, {histogram['above']:,} above)",
        )
    axes.set_xscale("log")
    axes.set_yscale("symlog", linthresh=1)
    axes.set_xlabel("per-token KL (nats, log scale)")
    axes.set_ylabel("tokens")
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    axes.set_title(title)
    return png_bytes(figure)


def signed_histogram(histogram: dict, title: str, xlabel: str) -> bytes:
    """Plot a stored histogram of a signed per-token value such as delta p."""
    figure = Figure(figsize=(7.5, 3.4), layout="constrained")
    axes = figure.subplots()
    edges = np.asarray(histogram["edges"])
    axes.stairs(np.asarray(histogram["counts"]), edges, fill=True)
    axes.axvline(0, color="black", linewidth=0.8)
    # Bins are log-spaced in magnitude, so the axis is too, linear near zero.
    smallest = float(np.abs(edges[edges != 0]).min())
    axes.set_xscale("symlog", linthresh=smallest)
    axes.set_yscale("symlog", linthresh=1)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("tokens")
    axes.grid(alpha=0.3)
    axes.set_title(title)
    return png_bytes(figure)


def signed_ladder(summary: dict, title: str) -> bytes:
    """Plot the percentiles of a signed per-token value such as delta p."""
    figure = Figure(figsize=(7.5, 3.4), layout="constrained")
    axes = figure.subplots()
    ladder = [(n, v) for n, v in _ladder(summary) if math.isfinite(v)]
    colors = ["tab:red" if value < 0 else "tab:blue" for _, value in ladder]
    axes.bar([name for name, _ in ladder], [value for _, value in ladder], color=colors)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xlabel("percentile of per-token values")
    axes.set_ylabel("p_model(x) - p_ref(x)")
    axes.grid(alpha=0.3, axis="y")
    axes.set_title(title)
    return png_bytes(figure)


_LADDER_ORDER = (
    "min", "p1", "p5", "p10", "p25", "median", "p75", "p90", "p95", "p99", "p999", "max"
)  # fmt: skip


def _ladder(summary: dict) -> list[tuple[str, float]]:
    ladder = []
    for name in _LADDER_ORDER:
        value = summary.get(name)
        if value is None:
            continue
        ladder.append((name, float(value)))
    return ladder
