"""Perplexity of many checkpoints in one run, ordered by training step, resumable.

``lmeval ppl --model run/checkpoint-100 run/checkpoint-200`` (or a quoted glob such as
``'run/checkpoint-*'``) scores each checkpoint into ``--output DIR/NAME`` and writes
``summary.json`` and ``summary.md`` in DIR: perplexity by step. A checkpoint whose
directory holds the finished results of the same configuration is skipped, so a run
killed at checkpoint 30 of 50 continues at checkpoint 30 when started again (pass
--resume to also continue the documents of that checkpoint).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
from collections.abc import Sequence
from pathlib import Path

from lmeval.config import RunConfig
from lmeval.errors import ConfigError

logger = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_TABLE = "summary.md"
_PATTERN_CHARACTERS = frozenset("*?[")

#: Columns of the summary table: row key and Markdown heading.
COLUMNS = {
    "checkpoint": "checkpoint",
    "step": "step",
    "perplexity": "perplexity",
    "perplexity_stderr": "± stderr",
    "bits_per_byte": "bits/byte",
    "accuracy": "top-1 accuracy",
    "num_tokens": "tokens",
    "reused": "reused",
}


def is_pattern(spec: str) -> bool:
    """Return whether ``spec`` is a glob pattern (contains ``*``, ``?`` or ``[``)."""
    return any(character in _PATTERN_CHARACTERS for character in spec)


def expand_models(specs: str | Sequence[str]) -> list[str]:
    """Expand glob patterns among ``specs`` into the sorted paths they match.

    A shell expands an unquoted glob before lmeval runs; a quoted one (or one in a
    config file) is expanded here. Other specs (names, paths, hub ids) are kept as
    they are, and each spec is kept once.

    Raises:
        ConfigError: when a pattern matches no path.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    expanded: list[str] = []
    for spec in specs:
        if not is_pattern(spec):
            expanded.append(spec)
            continue
        matches = sorted(glob.glob(str(Path(spec).expanduser())))
        if not matches:
            raise ConfigError(
                f"--model pattern {spec!r} matched no paths; check the directory and the pattern"
            )
        expanded += matches
    return list(dict.fromkeys(expanded))


def run_checkpoints(
    config: RunConfig, progress_bar: bool = True, save_tokens: bool = False
) -> dict:
    """Score every checkpoint of ``config.model`` (a list) and write the summary.

    Returns:
        ``{"command": "ppl-checkpoints", "rows": [...], "files": {...}}``, also
        written as summary.json; one row per checkpoint, in order of step.

    Raises:
        ConfigError: without --output, with two checkpoints of the same directory
            name, or on any error of :func:`lmeval.run.run_perplexity`.
    """
    # Imported here so that the command line can expand --model without torch.
    from lmeval.distributed import joined
    from lmeval.drift import order_checkpoints
    from lmeval.results import library_versions, now, write_json_atomic
    from lmeval.run import run_perplexity

    checkpoints = order_checkpoints(expand_models(config.model))
    _check_checkpoints(config, checkpoints)
    output = Path(config.output)
    rows = []
    with joined(None, config.device, config.device_map) as group:
        for index, checkpoint in enumerate(checkpoints):
            logger.info("checkpoint %d of %d: %s", index + 1, len(checkpoints), checkpoint.path)
            directory = output / checkpoint.name
            run_config = dataclasses.replace(config, model=checkpoint.path, output=str(directory))
            results = run_perplexity(
                run_config, progress_bar, save_tokens, group=group, skip_finished=True
            )
            rows.append(checkpoint_row(checkpoint, results, directory))
        summary = {
            "command": "ppl-checkpoints",
            "created": now(),
            "rows": rows,
            "files": {
                "json": str(output / SUMMARY_JSON),
                "table": str(output / SUMMARY_TABLE),
            },
            "versions": library_versions(),
        }
        if group.is_main:
            write_json_atomic(output / SUMMARY_JSON, summary)
            (output / SUMMARY_TABLE).write_text(format_summary_table(rows) + "\n", "utf-8")
    return summary


def _check_checkpoints(config: RunConfig, checkpoints: Sequence) -> None:
    if not config.output:
        raise ConfigError(
            f"{len(checkpoints)} models given; pass --output DIR, which gets one "
            "directory of results per checkpoint"
        )
    names: dict[str, str] = {}
    for checkpoint in checkpoints:
        if checkpoint.name in names:
            raise ConfigError(
                f"checkpoints {names[checkpoint.name]!r} and {checkpoint.path!r} have the "
                f"same name {checkpoint.name!r}, so their results would share "
                f"{config.output}/{checkpoint.name}; score them in separate runs"
            )
        names[checkpoint.name] = checkpoint.path


def checkpoint_row(checkpoint, results: dict, directory: Path) -> dict:
    """Extract one checkpoint's summary row from its ppl results."""
    metrics = results["metrics"]
    return {
        "checkpoint": checkpoint.name,
        "path": checkpoint.path,
        "step": checkpoint.step,
        "perplexity": metrics["perplexity"],
        "perplexity_stderr": metrics["perplexity_stderr"],
        "perplexity_interval": metrics["perplexity_interval"],
        "mean_nll": metrics["mean_nll"],
        "bits_per_byte": metrics["bits_per_byte"],
        "accuracy": metrics["accuracy"],
        "num_tokens": metrics["num_tokens"],
        "results": str(directory / "results.json"),
        "reused": "reused_from" in results,
    }


def format_summary_table(rows: Sequence[dict]) -> str:
    """Render summary rows as a Markdown table of perplexity by step."""
    lines = [
        "| " + " | ".join(COLUMNS.values()) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in COLUMNS) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
