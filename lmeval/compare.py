"""Compare the results of runs metric by metric, and say which differences exceed the noise.

A difference is called outside the error bars by one of three tests, named in each row:

- ``paired t-test``: for ppl metrics, when both runs' documents.jsonl rows cover the
  same two or more documents. The per-document difference of the metric's ratio
  (sum NLL over tokens, bytes or words; correct over tokens) gets a delta-method
  standard error from the n documents, and the difference is outside when it exceeds
  the two-sided 95% quantile of Student's t with n - 1 degrees of freedom times that
  error: 12.7 for two documents, 2.26 for ten, 1.98 for a hundred. The standard error
  of a handful of documents is itself uncertain, which 1.96 would ignore. This is the
  test for two models on the same text.

- ``z-test``: otherwise, where both runs store a standard error for the metric (mean NLL, and so
  perplexity; accuracy; the KL metrics), ``|b - a| / sqrt(se_a^2 + se_b^2) > 1.96``.
  The test treats the runs as independent samples. Two runs on the same documents are
  positively correlated, so the test is conservative for them: it misses some real
  differences but does not invent them.
- ``95% intervals``: where only intervals are stored (bits per byte, word and byte
  perplexity), the two 95% intervals do not overlap. This is stricter still.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmeval.errors import ConfigError
from lmeval.metrics import Z_95, paired_ratio_difference
from lmeval.results import DOCUMENTS_FILE, read_rows, run_differences

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
#: Parts of results.json that should match for a difference to be the model's alone.
SETTINGS_COMPARED = ("data", "protocol", "reference")
#: Protocol values that change how tokens are batched, not which tokens are scored.
BATCHING_KEYS = ("batch_size", "logits_chunk_size", "padding_side")


@dataclass(frozen=True)
class MetricSpec:
    """How to read one metric, and its standard error or interval, from results.json."""

    name: str
    label: str
    value: Callable[[dict], float | None]
    stderr: Callable[[dict], float | None] | None = None
    interval: Callable[[dict], list[float] | None] | None = None
    #: Metric whose standard error tests this one (perplexity is tested on mean NLL).
    tested_on: str | None = None
    #: Row fields (numerator, denominator) of the per-document ratio behind the metric,
    #: for the paired test of two runs on the same documents.
    paired: tuple[str, str] | None = None


@dataclass(frozen=True)
class ComparisonRow:
    """One metric of two runs: values, difference b - a and the test's verdict."""

    name: str
    label: str
    value_a: float | None
    value_b: float | None
    difference: float | None
    outside: bool | None
    test: str | None


def _key(name: str) -> Callable[[dict], float | None]:
    return lambda m: _number(m.get(name))


def _nested(name: str, field: str) -> Callable[[dict], float | None]:
    return lambda m: _number((m.get(name) or {}).get(field))


def _interval(name: str) -> Callable[[dict], list[float] | None]:
    return lambda m: m.get(f"{name}_interval")


PER_TOKEN = ("sum_nll", "num_tokens")
PER_BYTE = ("sum_nll", "num_bytes")
PPL_METRICS = (
    MetricSpec(
        "perplexity",
        "perplexity",
        _key("perplexity"),
        _key("mean_nll_stderr"),
        tested_on="mean_nll",
        paired=PER_TOKEN,
    ),
    MetricSpec(
        "mean_nll",
        "mean NLL (nats/token)",
        _key("mean_nll"),
        _key("mean_nll_stderr"),
        paired=PER_TOKEN,
    ),
    MetricSpec(
        "bits_per_byte",
        "bits per byte",
        _key("bits_per_byte"),
        interval=_interval("bits_per_byte"),
        paired=PER_BYTE,
    ),
    MetricSpec(
        "byte_perplexity",
        "byte perplexity",
        _key("byte_perplexity"),
        interval=_interval("byte_perplexity"),
        paired=PER_BYTE,
    ),
    MetricSpec(
        "word_perplexity",
        "word perplexity",
        _key("word_perplexity"),
        interval=_interval("word_perplexity"),
        paired=("sum_nll", "num_words"),
    ),
    MetricSpec(
        "accuracy",
        "accuracy (top-1)",
        _key("accuracy"),
        _key("accuracy_stderr"),
        paired=("num_correct", "num_tokens"),
    ),
    MetricSpec("num_tokens", "tokens", _key("num_tokens")),
)

KL_METRICS = (
    MetricSpec(
        "kl_model_ref",
        "KL(model || ref) mean",
        _nested("kl_model_ref", "mean"),
        _nested("kl_model_ref", "stderr"),
    ),
    MetricSpec(
        "kl_ref_model",
        "KL(ref || model) mean",
        _nested("kl_ref_model", "mean"),
        _nested("kl_ref_model", "stderr"),
    ),
    MetricSpec("kl_ref_model_p99", "KL(ref || model) p99", _nested("kl_ref_model", "p99")),
    MetricSpec("js", "Jensen-Shannon", _key("js"), _key("js_stderr")),
    MetricSpec("tv", "total variation", _key("tv"), _key("tv_stderr")),
    MetricSpec(
        "top1_agreement", "top-1 agreement", _key("top1_agreement"), _key("top1_agreement_stderr")
    ),
    MetricSpec("delta_p", "delta p mean", _nested("delta_p", "mean"), _nested("delta_p", "stderr")),
    MetricSpec(
        "log_ppl_ratio",
        "ln(PPL model / PPL ref)",
        _key("log_ppl_ratio"),
        _key("log_ppl_ratio_stderr"),
    ),
    MetricSpec("perplexity_model", "perplexity (model)", _key("perplexity_model")),
    MetricSpec("perplexity_ref", "perplexity (reference)", _key("perplexity_ref")),
    MetricSpec("num_tokens", "tokens", _key("num_tokens")),
)


def load_results(path: str | Path) -> dict:
    """Read ``results.json`` from a run directory (or the file itself).

    Raises:
        ConfigError: when the file is missing or is not valid JSON.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{str(file)!r} not found; pass the --output directory of a finished run"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {str(file)!r}: {error}") from error


def metric_specs(results: dict) -> tuple[MetricSpec, ...]:
    """Return the metrics compared for a run of this command (ppl or kl)."""
    command = results.get("command")
    if command == "ppl":
        return PPL_METRICS
    if command == "kl":
        return KL_METRICS
    raise ConfigError(f"cannot compare runs of command {command!r}; compare ppl or kl runs")


def compare_results(
    a: dict,
    b: dict,
    rows_a: Sequence[dict] = (),
    rows_b: Sequence[dict] = (),
) -> list[ComparisonRow]:
    """Compare two results objects of the same command, metric by metric.

    With the documents.jsonl rows of both runs, and the same two or more documents
    scored in each, ppl metrics are tested by the paired test (see :func:`paired_rows`).

    Raises:
        ConfigError: when the runs are of different commands, or of one that has no
            metrics to compare.
    """
    if a.get("command") != b.get("command"):
        raise ConfigError(
            f"cannot compare a {a.get('command')!r} run with a {b.get('command')!r} run"
        )
    metrics_a, metrics_b = a.get("metrics") or {}, b.get("metrics") or {}
    pairs = paired_rows(rows_a, rows_b)
    return [_compare_metric(spec, metrics_a, metrics_b, pairs) for spec in metric_specs(a)]


def paired_rows(
    rows_a: Sequence[dict], rows_b: Sequence[dict]
) -> tuple[list[dict], list[dict]] | None:
    """Return the scored rows of two runs when both scored the same documents, else None.

    The documents must match by index and id, two or more of them. Paired, what the
    documents differ in cancels, so the test sees differences that the independent
    z-test is too wide to see.
    """
    scored_a = sorted(
        (row for row in rows_a if row.get("skipped") is None and "sum_nll" in row),
        key=lambda row: row["index"],
    )
    scored_b = sorted(
        (row for row in rows_b if row.get("skipped") is None and "sum_nll" in row),
        key=lambda row: row["index"],
    )
    if len(scored_a) < 2:
        return None
    keys_a = [(row["index"], row.get("id")) for row in scored_a]
    keys_b = [(row["index"], row.get("id")) for row in scored_b]
    if keys_a != keys_b:
        return None
    return scored_a, scored_b


def setting_differences(a: dict, b: dict) -> list[str]:
    """List how two runs differ in data, scoring protocol or reference model.

    Such differences mix with the models' own in every metric, so ``lmeval compare``
    warns about them. Batch size and logits chunk size are left out: they change
    rounding only, and so are the paths of data files: their sha256 identifies them.
    """
    settings = []
    for run in (a, b):
        chosen = {key: run.get(key) for key in SETTINGS_COMPARED if key in a or key in b}
        if isinstance(chosen.get("protocol"), dict):
            chosen["protocol"] = {
                key: value for key, value in chosen["protocol"].items() if key not in BATCHING_KEYS
            }
        chosen["data"] = _without_file_paths(chosen.get("data"))
        settings.append(chosen)
    return run_differences(*settings, max_listed=5)


def _without_file_paths(data):
    """Return a copy of a data identity without the paths of its local files."""
    if not isinstance(data, dict) or not isinstance(data.get("source"), dict):
        return data
    files = data["source"].get("files")
    if not isinstance(files, list):
        return data
    files = [
        {key: value for key, value in file.items() if key != "path"}
        if isinstance(file, dict) and file.get("sha256")
        else file
        for file in files
    ]
    return data | {"source": data["source"] | {"files": files}}


def _compare_metric(
    spec: MetricSpec, a: dict, b: dict, pairs: tuple[list[dict], list[dict]] | None
) -> ComparisonRow:
    value_a, value_b = spec.value(a), spec.value(b)
    difference = None
    if value_a is not None and value_b is not None:
        difference = value_b - value_a
    outside, test = None, None
    if pairs is not None and spec.paired is not None:
        numerator, denominator = spec.paired
        rows_a, rows_b = pairs
        ratio_difference, stderr = paired_ratio_difference(
            [row[numerator] for row in rows_a],
            [row[denominator] for row in rows_a],
            [row[numerator] for row in rows_b],
            [row[denominator] for row in rows_b],
        )
        outside = t_test_outside(ratio_difference, stderr, len(rows_a) - 1)
        test = f"paired t-test, {len(rows_a)} documents"
    elif spec.stderr is not None:
        test = "z-test" if spec.tested_on is None else f"z-test on {spec.tested_on}"
        outside = z_test_outside(
            _tested_value(spec, a), spec.stderr(a), _tested_value(spec, b), spec.stderr(b)
        )
    elif spec.interval is not None:
        test = "95% intervals"
        outside = intervals_disjoint(spec.interval(a), spec.interval(b))
    return ComparisonRow(spec.name, spec.label, value_a, value_b, difference, outside, test)


def _tested_value(spec: MetricSpec, metrics: dict) -> float | None:
    return _number(metrics.get(spec.tested_on)) if spec.tested_on else spec.value(metrics)


def z_test_outside(
    value_a: float | None, stderr_a: float | None, value_b: float | None, stderr_b: float | None
) -> bool | None:
    """Return whether ``|b - a|`` exceeds 1.96 standard errors of the difference.

    Returns None when a value or standard error is missing or not finite.
    """
    numbers = (value_a, stderr_a, value_b, stderr_b)
    if any(x is None or not math.isfinite(x) for x in numbers):
        return None
    scale = math.hypot(stderr_a, stderr_b)
    if scale == 0:
        return value_a != value_b
    return abs(value_b - value_a) / scale > Z_95


def t_test_outside(difference: float, stderr: float | None, degrees_of_freedom: int) -> bool | None:
    """Return whether ``|difference|`` exceeds Student's t 97.5% quantile times ``stderr``.

    Returns None when the standard error is missing or not finite.
    """
    from scipy.stats import t as student_t

    if stderr is None or not math.isfinite(stderr) or not math.isfinite(difference):
        return None
    if stderr == 0:
        return bool(difference != 0)
    return bool(abs(difference) / stderr > float(student_t.ppf(0.975, degrees_of_freedom)))


def intervals_disjoint(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    """Return whether two [low, high] intervals do not overlap; None if one is missing."""
    if not a or not b or any(x is None or not math.isfinite(x) for x in (*a, *b)):
        return None
    return a[1] < b[0] or b[1] < a[0]


def format_comparison(rows: Sequence[ComparisonRow], label_a: str, label_b: str) -> str:
    """Render comparison rows as a plain-text table for stdout."""
    header = ("metric", label_a, label_b, "difference", "outside error bars", "test")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.label,
                format_number(row.value_a),
                format_number(row.value_b),
                format_number(row.difference, signed=True),
                verdict(row.outside),
                row.test or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_number(value: float | None, signed: bool = False) -> str:
    """Format a metric for tables: counts with separators, other values to 4 decimals."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:+,}" if signed else f"{value:,}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def verdict(outside: bool | None) -> str:
    """Render a test result as yes, no, or n/a when it could not be computed."""
    if outside is None:
        return "n/a"
    return "yes" if outside else "no"


def _number(value) -> float | None:
    """Read a results.json number; kl runs write infinities as "inf" and "-inf"."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value)


def add_compare_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="compare two runs metric by metric",
        description="Print each metric of two runs, their difference b - a, and whether "
        "the difference is outside the error bars: a paired t-test over the documents "
        "when both ppl runs scored the same documents, else a z-test on the standard "
        "errors where results.json has them, else non-overlapping 95% intervals.",
        epilog="example:\n  lmeval compare results/base results/finetuned",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_a", metavar="RUN_A", help="output directory of the first run")
    parser.add_argument("run_b", metavar="RUN_B", help="output directory of the second run")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.set_defaults(handler=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> int:
    a, b = load_results(args.run_a), load_results(args.run_b)
    rows = compare_results(a, b, _document_rows(args.run_a), _document_rows(args.run_b))
    differences = setting_differences(a, b)
    if differences:
        logger.warning(
            "the runs differ in more than the model, so the differences below mix both: %s",
            "; ".join(differences),
        )
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(format_comparison(rows, "A", "B"))
    print()
    for name, path, results in (("A", args.run_a, a), ("B", args.run_b, b)):
        print(f"{name} = {path} ({_model_label(results.get('model') or {})})")
    legends = {
        "paired t-test": "paired t-test: |B - A| > t(0.975, documents - 1) standard errors "
        "of the per-document differences",
        "z-test": "z-test: |B - A| > 1.96 combined standard errors, the runs taken as independent",
        "95% intervals": "95% intervals: the two intervals do not overlap",
    }
    used = [text for name, text in legends.items() if any(_uses(row, name) for row in rows)]
    if used:
        print("; ".join(used))
    return 0


def _uses(row: ComparisonRow, test: str) -> bool:
    """Tell whether ``row`` was decided by ``test`` (a z-test on mean NLL counts too)."""
    return bool(row.test) and row.test.startswith(test)


def _document_rows(path: str) -> list[dict]:
    directory = Path(path)
    return read_rows(directory / DOCUMENTS_FILE) if directory.is_dir() else []


def _model_label(model: dict) -> str:
    return ", ".join(str(model[key]) for key in ("spec", "dtype") if model.get(key))
