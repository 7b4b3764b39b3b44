"""Drift across checkpoints: each checkpoint's KL from one reference, as a table and a plot.

:func:`run_drift` writes the reference cache once (unless an existing one is given),
compares every checkpoint with it through :func:`lmeval.kl_run.run_kl`, and writes
into the output directory:

- ``drift.md``, ``drift.csv`` and ``drift.json``: one row per checkpoint;
- ``drift.png``: mean KL in both directions and perplexity against the training step,
  or against the order of the checkpoints when a step is unknown;
- ``checkpoints/NN-NAME/``: each checkpoint's results.json and documents.jsonl;
- ``reference-cache.safetensors``, unless ``reference_cache`` names another file.

Running the same command again skips every checkpoint whose results.json exists for
the same configuration, and compares again one that a killed run left unfinished.
Under torchrun, every checkpoint's comparison is shared by the ranks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmeval.distributed import joined
from lmeval.errors import ConfigError
from lmeval.kl_run import KL_CONFIG_TYPES, KLConfig, run_kl
from lmeval.results import check_output_directory, library_versions, now, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FILE = "reference-cache.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

#: Columns of the drift table: result key and Markdown heading.
COLUMNS = {
    "checkpoint": "checkpoint",
    "step": "step",
    "kl_model_ref": "KL(model‖ref)",
    "kl_ref_model": "KL(ref‖model)",
    "kl_ref_model_p99": "KL(ref‖model) p99",
    "js": "JS",
    "top1_agreement": "top-1 agree",
    "perplexity_model": "PPL model",
    "perplexity_ref": "PPL ref",
    "log_ppl_ratio": "ln PPL ratio",
    "num_tokens": "tokens",
}


@dataclass
class DriftConfig(KLConfig):
    """Every option of ``lmeval drift``: those of :class:`KLConfig` and the checkpoints."""

    checkpoints: list[str] | None = None


DRIFT_CONFIG_TYPES = {**KL_CONFIG_TYPES, "checkpoints": list}


@dataclass(frozen=True)
class Checkpoint:
    """A model to compare, with the training step it was saved at when known."""

    path: str
    name: str
    step: int | None


def checkpoint_step(path: str | Path) -> int | None:
    """Return the training step of a checkpoint, or None when nothing gives it.

    The step is ``global_step`` of the directory's trainer_state.json, else the number
    in a name of the form ``checkpoint-500``.
    """
    path = Path(path)
    state_file = path / TRAINER_STATE_FILE
    if state_file.is_file():
        try:
            step = json.loads(state_file.read_text(encoding="utf-8"))["global_step"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable %s: %s", state_file, error)
        else:
            if isinstance(step, int) and not isinstance(step, bool):
                return step
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def order_checkpoints(paths: Sequence[str]) -> list[Checkpoint]:
    """Return the checkpoints sorted by step when every step is known, else as given."""
    checkpoints = [
        Checkpoint(path, Path(path).name or path, checkpoint_step(path)) for path in paths
    ]
    if all(checkpoint.step is not None for checkpoint in checkpoints):
        checkpoints.sort(key=lambda checkpoint: checkpoint.step)
    return checkpoints


def run_drift(config: DriftConfig, progress_bar: bool = True) -> dict:
    """Compare every checkpoint with the reference and write the table and plot.

    Returns:
        ``{"command": "drift", "rows": [...], "files": {...}, ...}``, also written as
        drift.json. Each row contains the checkpoint, its step and the headline metrics.

    Raises:
        ConfigError: on missing checkpoints or output, or any error of :func:`run_kl`,
            such as an output directory that contains a drift run of other options.
    """
    _check_drift_config(config)
    check_output_directory(config.output)
    with joined(None, config.device, config.device_map) as group:
        return _run_drift(config, progress_bar, group)


def _run_drift(config: DriftConfig, progress_bar: bool, group) -> dict:
    output = Path(config.output)
    checkpoints = order_checkpoints(config.checkpoints)
    cache = _prepare_reference_cache(config, output, progress_bar, group)

    rows = []
    for index, checkpoint in enumerate(checkpoints):
        logger.info("checkpoint %d of %d: %s", index + 1, len(checkpoints), checkpoint.path)
        run_config = dataclasses.replace(
            _kl_config(config),
            model=checkpoint.path,
            reference_cache=str(cache),
            output=str(output / "checkpoints" / f"{index:02d}-{checkpoint.name}"),
            json=False,
            cache_format=None,
            cache_dtype=None,
            cache_top_k=None,
        )
        results = run_kl(run_config, progress_bar, group=group, skip_finished=True)
        rows.append(drift_row(checkpoint, index, results))

    x_axis = "step" if all(row["step"] is not None for row in rows) else "order"
    files = {
        "table": str(output / "drift.md"),
        "csv": str(output / "drift.csv"),
        "json": str(output / "drift.json"),
        "plot": str(output / "drift.png"),
        "reference_cache": str(cache),
    }
    summary = {
        "command": "drift",
        "created": now(),
        "reference": config.reference,
        "x_axis": x_axis,
        "rows": rows,
        "files": files,
        "versions": library_versions(),
    }
    if group.is_main:
        (output / "drift.md").write_text(format_markdown_table(rows) + "\n", encoding="utf-8")
        write_csv(rows, output / "drift.csv")
        plot_drift(rows, output / "drift.png", x_axis)
        write_json_atomic(output / "drift.json", summary)
    return summary


def _check_drift_config(config: DriftConfig) -> None:
    if not config.checkpoints:
        raise ConfigError("no checkpoints given; pass one or more model directories")
    if config.model is not None:
        raise ConfigError("drift takes the checkpoints as arguments, not --model")
    if config.save_reference is not None:
        raise ConfigError(
            "drift writes its reference cache to --reference-cache, not --save-reference"
        )
    if not config.output:
        raise ConfigError("drift writes files; pass --output DIR")


def _kl_config(config: DriftConfig) -> KLConfig:
    names = [field.name for field in dataclasses.fields(KLConfig)]
    return KLConfig(**{name: getattr(config, name) for name in names})


def _prepare_reference_cache(config: DriftConfig, output: Path, progress_bar: bool, group) -> Path:
    """Return the reference cache to use, writing it first when it does not exist."""
    cache = Path(config.reference_cache) if config.reference_cache else output / CACHE_FILE
    # Rank 0 decides, so that every rank takes the same path through the collectives.
    if group.broadcast(cache.exists()):
        logger.info("reusing reference cache %s", cache)
        given = [config.cache_format, config.cache_dtype, config.cache_top_k]
        if any(value is not None for value in given):
            logger.warning(
                "ignoring --cache-format, --cache-dtype and --cache-top-k: %s exists and is "
                "used as it is",
                cache,
            )
        return cache
    if config.reference is None:
        raise ConfigError(
            f"reference cache {str(cache)!r} does not exist; pass --reference to write it"
        )
    output.mkdir(parents=True, exist_ok=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    run_kl(
        dataclasses.replace(
            _kl_config(config),
            model=None,
            reference_cache=None,
            save_reference=str(cache),
            output=None,
            json=False,
        ),
        progress_bar,
        group=group,
    )
    return cache


def drift_row(checkpoint: Checkpoint, index: int, results: dict) -> dict:
    """Extract one checkpoint's table row from its kl results."""
    m = results["metrics"]
    return {
        "checkpoint": checkpoint.name,
        "path": checkpoint.path,
        "step": checkpoint.step,
        "order": index + 1,
        "kl_model_ref": m["kl_model_ref"]["mean"],
        "kl_model_ref_stderr": m["kl_model_ref"]["stderr"],
        "kl_ref_model": m["kl_ref_model"]["mean"],
        "kl_ref_model_stderr": m["kl_ref_model"]["stderr"],
        "kl_ref_model_p99": m["kl_ref_model"]["p99"],
        "js": m["js"],
        "top1_agreement": m["top1_agreement"],
        "top5_overlap": m["top5_overlap"],
        "perplexity_model": m["perplexity_model"],
        "perplexity_ref": m["perplexity_ref"],
        "log_ppl_ratio": m["log_ppl_ratio"],
        "num_tokens": m["num_tokens"],
        "estimate": results["estimate"],
    }


def format_markdown_table(rows: Sequence[dict]) -> str:
    """Render drift rows as a Markdown table."""
    lines = [
        "| " + " | ".join(COLUMNS.values()) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [_cell(row[key]) for key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Write drift rows as CSV, one column per row key."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_drift(rows: Sequence[dict], path: Path, x_axis: str) -> None:
    """Plot mean KL (both directions) and perplexity against step or order as a PNG."""
    # The Figure API draws with the Agg canvas and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    x = [row["step"] if x_axis == "step" else row["order"] for row in rows]
    figure = Figure(figsize=(7, 6), layout="constrained")
    kl_axes, ppl_axes = figure.subplots(2, 1, sharex=True)
    for key, label in (("kl_model_ref", "KL(model ‖ ref)"), ("kl_ref_model", "KL(ref ‖ model)")):
        values = [_float(row[key]) for row in rows]
        errors = [_float(row[f"{key}_stderr"]) or 0.0 for row in rows]
        kl_axes.errorbar(x, values, yerr=errors, marker="o", capsize=3, label=label)
    kl_axes.set_ylim(bottom=0)
    kl_axes.set_ylabel("mean KL per token (nats)")
    kl_axes.legend()
    kl_axes.grid(alpha=0.3)

    ppl_axes.plot(x, [_float(row["perplexity_model"]) for row in rows], marker="o", label="model")
    ppl_axes.axhline(
        _float(rows[0]["perplexity_ref"]), linestyle="--", color="gray", label="reference"
    )
    ppl_axes.set_ylabel("perplexity")
    ppl_axes.legend()
    ppl_axes.grid(alpha=0.3)
    if x_axis == "step":
        ppl_axes.set_xlabel("training step")
    else:
        ppl_axes.set_xlabel("checkpoint")
        ppl_axes.set_xticks(x, [row["checkpoint"] for row in rows], rotation=30, ha="right")
    figure.suptitle(f"Drift from the reference ({rows[0]['estimate']} KL)")
    figure.savefig(path, dpi=120)


def _float(value) -> float | None:
    """Turn a results value (a number, "inf" or None) into a float for plotting."""
    if value is None:
        return None
    return float(value)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
