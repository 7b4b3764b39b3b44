"""Build a self-contained HTML report, and the same content as Markdown, from run outputs.

``lmeval report RUN_DIR [RUN_DIR ...]`` reads each directory's results.json (a ppl or
kl run) or drift.json (a drift run), with documents.jsonl and tokens.parquet when they
are there. The report is a list of sections made of a few block types (text, notes,
tables, figures, tokens in context); :func:`render_html` and :func:`render_markdown`
render the same blocks. The HTML embeds its figures as base64 PNG and its CSS inline,
so it opens offline; the Markdown refers to PNG files written beside it.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmeval.compare import (
    compare_results,
    format_number,
    load_results,
    setting_differences,
    verdict,
)
from lmeval.errors import ConfigError

logger = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
TOKENS_FILE = "tokens.parquet"
DRIFT_FILE = "drift.json"
#: Written by a multi-checkpoint ppl run beside its checkpoints' run directories.
SERIES_FILE = "summary.json"
#: Metrics of the ppl headline table that have a 95% interval.
INTERVAL_METRICS = {
    "perplexity": "perplexity",
    "mean_nll": "mean NLL (nats/token)",
    "bits_per_byte": "bits per byte",
    "byte_perplexity": "byte perplexity",
    "word_perplexity": "word perplexity",
    "accuracy": "accuracy (top-1)",
}
COUNT_METRICS = {
    "num_tokens": "tokens",
    "num_words": "words",
    "num_bytes": "bytes",
    "num_documents": "documents",
    "num_skipped": "skipped documents",
}


# Blocks ----------------------------------------------------------------------------


def _plots():
    """Import the figure module on first use: matplotlib is slow to load."""
    from lmeval import plots

    return plots


@dataclass
class Text:
    text: str


@dataclass
class Note:
    """A part of the report that was skipped and why, or a warning about the numbers."""

    text: str
    label: str = "Skipped"


@dataclass
class Table:
    """Rows of cells; ``keys[i]``, when given, names the results.json value of row i."""

    header: list[str]
    rows: list[list[str]]
    keys: list[str | None] | None = None
    #: Key-value tables keep every row open and their values left-aligned.
    key_value: bool = False


@dataclass
class Image:
    title: str
    png: bytes


@dataclass
class TokenInContext:
    """A token with the text before it; each piece carries its NLL, or None if unknown."""

    label: str
    pieces: list[tuple[str, float | None]]
    token: str
    token_nll: float
    detail: str


@dataclass
class Tokens:
    items: list[TokenInContext]
    max_nll: float


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


# Loading ---------------------------------------------------------------------------


@dataclass
class Run:
    """The outputs of one run directory."""

    path: Path
    results: dict
    documents: list[dict]
    tokens: dict[str, np.ndarray] | None

    @property
    def command(self) -> str:
        return str(self.results.get("command"))

    @property
    def label(self) -> str:
        model = self.results.get("model") or {}
        details = ", ".join(str(model[key]) for key in ("spec", "dtype") if model.get(key))
        return f"{self.path.name} ({details})" if details else self.path.name


def expand_series(run_dirs: Sequence[str | Path]) -> list[Path]:
    """Replace the output directory of a multi-checkpoint ppl run by its checkpoints' runs.

    Such a directory has summary.json and a run directory per checkpoint, listed there
    in order of training step; the report then compares the checkpoints.
    """
    expanded = []
    for run_dir in map(Path, run_dirs):
        summary = run_dir / SERIES_FILE
        if (run_dir / "results.json").exists() or not summary.exists():
            expanded.append(run_dir)
            continue
        try:
            rows = json.loads(summary.read_text(encoding="utf-8"))["rows"]
            paths = [Path(row["results"]).parent for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"cannot read {str(summary)!r}: {error}") from error
        expanded.extend(run_dir / path.name for path in paths)
    return expanded


def load_run(path: str | Path) -> Run:
    """Read the outputs of a run directory.

    Raises:
        ConfigError: when the directory has neither results.json nor drift.json.
    """
    path = Path(path)
    if (path / DRIFT_FILE).exists() and not (path / "results.json").exists():
        results = json.loads((path / DRIFT_FILE).read_text(encoding="utf-8"))
    else:
        results = load_results(path)
    documents = []
    if (path / DOCUMENTS_FILE).exists():
        from lmeval.results import read_rows

        documents = read_rows(path / DOCUMENTS_FILE)
    return Run(path, results, documents, _read_tokens(path / TOKENS_FILE))


def _read_tokens(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    columns = ["document_index", "position", "token", "token_nll"]
    table = pq.read_table(path, columns=columns)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


# Sections of a ppl run -------------------------------------------------------------


def ppl_sections(run: Run) -> list[Section]:
    """Return the sections of a perplexity run's report."""
    results = run.results
    diagnostics = results.get("diagnostics")
    sections = [Section("Headline", [headline_table(results)])]
    if not diagnostics or not diagnostics.get("num_tokens"):
        sections.append(
            Section(
                "Diagnostics",
                [Note("results.json has no diagnostics (a run of an older lmeval); skipped")],
            )
        )
    else:
        covered, scored = (
            diagnostics["num_tokens"],
            (results.get("metrics") or {}).get("num_tokens"),
        )
        if isinstance(scored, int) and covered < scored:
            sections.append(
                Section(
                    "Diagnostics",
                    [
                        Note(
                            f"the figures below cover {covered:,} of the {scored:,} scored "
                            "tokens: a resumed run has no per-token values of the documents "
                            "scored before the interruption",
                            label="Note",
                        )
                    ],
                )
            )
        sections.append(_position_section(results, diagnostics))
        sections.append(_calibration_section(diagnostics))
    sections.append(_documents_section(run, diagnostics))
    if diagnostics and diagnostics.get("highest_loss_tokens"):
        sections.append(_highest_loss_section(run, diagnostics))
    sections.append(methods_section(results))
    return sections


def headline_table(results: dict) -> Table:
    """Return the ppl headline table; each value cell formats one results.json number."""
    m = results["metrics"]
    rows, keys = [], []
    for name, label in INTERVAL_METRICS.items():
        rows.append([label, format_value(m.get(name)), format_interval(m.get(f"{name}_interval"))])
        keys.append(f"metrics.{name}")
    for name, label in COUNT_METRICS.items():
        rows.append([label, format_count(m.get(name)), ""])
        keys.append(f"metrics.{name}")
    timing = results.get("timing") or {}
    rows.append(["tokens/s", format_rate(timing.get("tokens_per_second")), ""])
    keys.append("timing.tokens_per_second")
    rows += [
        ["model", model_label(results.get("model") or {}), ""],
        ["data", data_label(results.get("data") or {}), ""],
        ["protocol", protocol_label(results.get("protocol") or {}), ""],
    ]
    keys += [None, None, None]
    note = results.get("interval_method")
    if note:
        rows.append(["interval", note, ""])
        keys.append(None)
    return Table(["metric", "value", "95% interval"], rows, keys)


def _position_section(results: dict, diagnostics: dict) -> Section:
    buckets = diagnostics["nll_by_window_position"]
    mean_nll = results["metrics"]["mean_nll"]
    rows = [
        [
            f"{b['start']}" if b["end"] - b["start"] == 1 else f"{b['start']}-{b['end'] - 1}",
            format_count(b["num_tokens"]),
            format_value(b["mean_nll"]),
            format_value(b["accuracy"]),
        ]
        for b in buckets
    ]
    return Section(
        "Loss by position within the window",
        [
            Text(
                "Mean NLL of the tokens predicted at each position of their window; "
                "position p means the model saw p + 1 input tokens, the prefix token "
                "included. Early positions have little context, so their loss is higher."
            ),
            Image(
                "Mean NLL by position within the window",
                _plots().nll_by_position(buckets, mean_nll),
            ),
            Table(["positions", "tokens", "mean NLL", "accuracy"], rows),
        ],
    )


def _calibration_section(diagnostics: dict) -> Section:
    calibration = diagnostics["calibration"]
    rows = [
        [
            f"{b['low']:.2f}-{b['high']:.2f}",
            format_count(b["num_tokens"]),
            format_value(b["mean_confidence"]),
            format_value(b["accuracy"]),
        ]
        for b in calibration["bins"]
        if b["num_tokens"]
    ]
    return Section(
        "Calibration",
        [
            Text(
                f"Confidence is the probability of the model's top-1 token; accuracy is "
                f"whether that token was the next token. {calibration['num_bins']} "
                f"equal-width bins; expected calibration error (ECE) "
                f"{calibration['ece']:.4f}, the token-weighted mean of |accuracy - mean "
                f"confidence| over bins. Mean confidence "
                f"{calibration['mean_confidence']:.4f}, accuracy {calibration['accuracy']:.4f}."
            ),
            Image("Reliability diagram", _plots().reliability_diagram(calibration)),
            Table(["confidence", "tokens", "mean confidence", "accuracy"], rows),
        ],
    )


def _documents_section(run: Run, diagnostics: dict | None) -> Section:
    section = Section("Documents")
    perplexities = [row["perplexity"] for row in run.documents if row.get("perplexity")]
    corpus = run.results["metrics"]["perplexity"]
    if len(perplexities) >= 2:
        section.blocks.append(
            Image("Per-document perplexity", _plots().document_perplexity(perplexities, corpus))
        )
    else:
        section.blocks.append(
            Note(
                f"no histogram of per-document perplexity: {DOCUMENTS_FILE} has "
                f"{len(perplexities)} scored document(s), and the histogram needs two or more"
            )
        )
    summary = (diagnostics or {}).get("documents")
    if summary:
        ladder = summary["perplexity_percentiles"]
        section.blocks.append(
            Text(
                "Per-document perplexity percentiles: "
                + ", ".join(f"{name} {value:.4f}" for name, value in ladder.items())
            )
        )
        rows = [
            [
                str(d["index"]),
                d["title"] or d["id"],
                format_count(d["num_tokens"]),
                format_value(d["mean_nll"]),
                format_value(d["perplexity"]),
            ]
            for d in summary["worst"]
        ]
        section.blocks.append(Text("Documents with the highest perplexity:"))
        section.blocks.append(
            Table(["index", "document", "tokens", "mean NLL", "perplexity"], rows)
        )
    return section


def _highest_loss_section(run: Run, diagnostics: dict) -> Section:
    records = diagnostics["highest_loss_tokens"]
    items = []
    for rank, record in enumerate(records, start=1):
        items.append(
            TokenInContext(
                label=f"{rank}. doc {record['document']} pos {record['position']}",
                pieces=_context_pieces(run, record),
                token=record["token"],
                token_nll=record["token_nll"],
                detail=f"NLL {record['token_nll']:.3f}, top-1 p {record['top1_prob']:.3f}",
            )
        )
    coloured = "each context token" if run.tokens is not None else "the token"
    note = "" if run.tokens is not None else " (run with --save-tokens to colour the context)"
    return Section(
        "Highest-loss tokens",
        [
            Text(
                f"The {len(records)} tokens with the largest NLL, in bold, after the text "
                f"before them; the colour of {coloured} grows with its NLL{note}."
            ),
            Tokens(items, max(record["token_nll"] for record in records)),
        ],
    )


def _context_pieces(run: Run, record: dict) -> list[tuple[str, float | None]]:
    """Return the context before a token, split into tokens with NLLs if tokens.parquet exists."""
    tokens = run.tokens
    if tokens is None:
        return [(record["context"], None)]
    rows = np.flatnonzero(tokens["document_index"] == record["document"])
    rows = rows[(tokens["position"][rows] < record["position"])]
    rows = rows[-_context_length(record) :] if len(rows) else rows
    pieces = [(str(tokens["token"][i]), float(tokens["token_nll"][i])) for i in rows]
    # Tokens decoded one by one lose the spaces a word-level tokenizer puts between
    # them; fall back to the decoded context where neither joining reproduces it.
    if "".join(text for text, _ in pieces) == record["context"]:
        return pieces
    if " ".join(text for text, _ in pieces) == record["context"]:
        return [(text + " ", nll) for text, nll in pieces]
    return [(record["context"], None)]


def _context_length(record: dict) -> int:
    from lmeval.diagnostics import CONTEXT_TOKENS

    return min(CONTEXT_TOKENS, record["position"])


def methods_section(results: dict) -> Section:
    """Describe how the numbers were computed, from the records in results.json."""
    blocks: list = []
    definitions = dict(results.get("definitions") or {})
    definitions |= (results.get("diagnostics") or {}).get("definitions") or {}
    if results.get("interval_method"):
        definitions["interval"] = results["interval_method"]
    if results.get("stderr_method"):
        definitions["standard errors"] = results["stderr_method"]
    if definitions:
        blocks.append(Text("Definitions:"))
        blocks.append(_key_value_table(definitions))
    for key, title in (
        ("protocol", "Protocol (which tokens were scored, and how)"),
        ("model", "Model"),
        ("reference", "Reference model"),
        ("data", "Data"),
        ("timing", "Timing"),
        ("versions", "Library versions"),
    ):
        value = results.get(key)
        if isinstance(value, dict) and value:
            blocks.append(Text(f"{title}:"))
            blocks.append(_key_value_table(value))
    return Section("How these numbers were computed", blocks)


def _key_value_table(record: dict) -> Table:
    rows = []
    for key, value in record.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > 300:
            text = text[:297] + "..."
        rows.append([str(key), text])
    return Table(["key", "value"], rows, key_value=True)


# Sections of kl and drift runs ------------------------------------------------------


def kl_sections(run: Run) -> list[Section]:
    """Return the sections of a KL run's report; parts missing from results.json are noted."""
    m = run.results.get("metrics")
    if not m:
        return [
            Section("KL", [Note("results.json has no metrics (a reference-only run); skipped")]),
            methods_section(run.results),
        ]
    sections = [Section("Headline", [kl_headline_table(run.results)])]
    divergence = Section("Per-token KL divergence")
    ladder = {key: m.get(key) for key in ("kl_model_ref", "kl_ref_model")}
    names = {"kl_model_ref": "KL(model || ref)", "kl_ref_model": "KL(ref || model)"}
    if all(isinstance(value, dict) and "histogram" in value for value in ladder.values()):
        divergence.blocks.append(
            Image(
                "Histogram of per-token KL",
                _plots().kl_histogram(ladder, names, "Per-token KL (log-spaced bins)"),
            )
        )
    else:
        divergence.blocks.append(
            Note(
                "results.json of this kl run stores no KL histogram (an earlier lmeval "
                "wrote it); only the percentile ladder is drawn"
            )
        )
    if all(isinstance(value, dict) for value in ladder.values()):
        divergence.blocks.append(
            Image(
                "Percentile ladder of per-token KL",
                _plots().percentile_ladder(
                    ladder, names, "Per-token KL: percentile ladder (log scale)"
                ),
            )
        )
        divergence.blocks.append(_ladder_table(ladder))
    sections.append(divergence)
    delta_p = m.get("delta_p")
    if isinstance(delta_p, dict):
        section = Section(
            "Change in the probability of the true token",
            [
                Text(
                    "Delta p = p_model(x) - p_ref(x) for the text's next token x; "
                    f"mean {format_value(delta_p.get('mean'))}, "
                    f"RMS {format_value(delta_p.get('rms'))}."
                )
            ],
        )
        if delta_p.get("histogram"):
            section.blocks.append(
                Image(
                    "Histogram of delta p",
                    _plots().signed_histogram(
                        delta_p["histogram"], "Delta p: distribution", "p_model(x) - p_ref(x)"
                    ),
                )
            )
        section.blocks.append(
            Image("Delta p percentiles", _plots().signed_ladder(delta_p, "Delta p: percentiles"))
        )
        sections.append(section)
    worst = run.results.get("worst_tokens")
    if worst:
        sections.append(_kl_worst_section(worst, run.results.get("worst_tokens_by")))
    else:
        sections.append(Section("Tokens where the models disagree most", [Note("none stored")]))
    sections.append(methods_section(run.results))
    return sections


def kl_headline_table(results: dict) -> Table:
    m = results["metrics"]
    rows, keys = [], []
    for key, label in (("kl_model_ref", "KL(model || ref)"), ("kl_ref_model", "KL(ref || model)")):
        summary = m.get(key) or {}
        mean = format_significant(_float(summary.get("mean")))
        rows.append([f"{label} mean", mean, _stderr(summary)])
        keys.append(f"metrics.{key}.mean")
    for key, label, formatter in (
        ("js", "Jensen-Shannon", format_significant),
        ("tv", "total variation", format_significant),
        ("top1_agreement", "top-1 agreement", format_value),
        ("log_ppl_ratio", "ln(PPL model / PPL ref)", format_significant),
    ):
        stderr = m.get(f"{key}_stderr")
        rows.append([label, formatter(_float(m.get(key))), _stderr({"stderr": stderr})])
        keys.append(f"metrics.{key}")
    for key, label in (
        ("top5_overlap", "top-5 overlap"),
        ("perplexity_model", "perplexity (model)"),
        ("perplexity_ref", "perplexity (reference)"),
    ):
        rows.append([label, format_value(_float(m.get(key))), ""])
        keys.append(f"metrics.{key}")
    rows.append(["tokens", format_count(m.get("num_tokens")), ""])
    keys.append("metrics.num_tokens")
    rows.append(["model", model_label(results.get("model") or {}), ""])
    rows.append(["reference", model_label(results.get("reference") or {}), ""])
    rows.append(["estimate", str(results.get("estimate")), ""])
    keys += [None, None, None]
    return Table(["metric", "value", "standard error"], rows, keys)


def _ladder_table(ladder: dict[str, dict]) -> Table:
    names = [n for n in _plots()._LADDER_ORDER if any(n in summary for summary in ladder.values())]
    rows = [
        [key] + [format_significant(_float(summary.get(name))) for name in names]
        for key, summary in ladder.items()
    ]
    return Table(["direction", *names], rows)


def _kl_worst_section(worst: list[dict], key: str | None) -> Section:
    items = []
    for rank, record in enumerate(worst, start=1):
        model_top = ", ".join(f"{t['token']!r} {t['probability']:.3g}" for t in record["model_top"])
        reference_top = ", ".join(
            f"{t['token']!r} {t['probability']:.3g}" for t in record["reference_top"]
        )
        value = _float(record.get(key or "kl_ref_model")) or 0.0
        items.append(
            TokenInContext(
                label=f"{rank}. doc {record['document']} pos {record['position']}",
                pieces=[(record["context"], None)],
                token=record["token"],
                token_nll=value,
                detail=f"KL(model || ref) {format_value(_float(record['kl_model_ref']))}, "
                f"KL(ref || model) {format_value(_float(record['kl_ref_model']))}; "
                f"model top: {model_top}; reference top: {reference_top}",
            )
        )
    finite = [item.token_nll for item in items if math.isfinite(item.token_nll)]
    return Section(
        "Tokens where the models disagree most",
        [
            Text(f"Ranked by {key}; the colour of the token grows with that divergence."),
            Tokens(items, max(finite, default=1.0)),
        ],
    )


def drift_sections(run: Run) -> list[Section]:
    """Return the sections of a drift run's report: KL and perplexity against checkpoint."""
    from lmeval.drift import COLUMNS, plot_drift

    rows = run.results.get("rows") or []
    if not rows:
        return [Section("Drift", [Note("drift.json has no rows; skipped")])]
    import io

    buffer = io.BytesIO()
    plot_drift(rows, buffer, run.results.get("x_axis", "order"))
    table = Table(
        list(COLUMNS.values()),
        [[_cell(row.get(key)) for key in COLUMNS] for row in rows],
    )
    return [
        Section(
            "Drift from the reference",
            [
                Text(f"Reference: {run.results.get('reference')}."),
                Image("KL and perplexity against checkpoint", buffer.getvalue()),
                table,
            ],
        )
    ]


# Several runs ------------------------------------------------------------------------


def comparison_section(runs: list[Run]) -> Section:
    """Compare every run with the first: values, differences and the test's verdict."""
    base = runs[0]
    section = Section("Comparison")
    others = [run for run in runs[1:] if run.command == base.command]
    for run in runs[1:]:
        if run.command != base.command:
            section.blocks.append(
                Note(f"{run.label} is a {run.command} run, not {base.command}; not compared")
            )
    if base.command not in ("ppl", "kl") or not others:
        section.blocks.append(Note("no runs of the same ppl or kl command to compare"))
        return section
    comparisons = [
        compare_results(base.results, run.results, base.documents, run.documents) for run in others
    ]
    header = ["metric", f"1: {base.label}"]
    for number, run in enumerate(others, start=2):
        header += [f"{number}: {run.label}", f"difference {number} - 1", "outside error bars"]
    rows = []
    for index, first in enumerate(comparisons[0]):
        row = [first.label, format_number(first.value_a)]
        for comparison in comparisons:
            item = comparison[index]
            row += [
                format_number(item.value_b),
                format_number(item.difference, signed=True),
                verdict(item.outside) + (f" ({item.test})" if item.test else ""),
            ]
        rows.append(row)
    section.blocks.append(
        Text(
            "Outside error bars: for ppl runs on the same two or more documents, a paired "
            "z-test, |b - a| > 1.96 delta-method standard errors of the per-document "
            "differences (of sum NLL over tokens, bytes or words, or of correct tokens). "
            "Otherwise a z-test on the difference, |b - a| / sqrt(se_a^2 + se_b^2) > 1.96, "
            "where both runs store a standard error (perplexity is tested on mean NLL), "
            "else non-overlapping 95% intervals. That z-test treats the runs as "
            "independent, which is conservative for two runs on the same documents."
        )
    )
    section.blocks.append(Table(header, rows))
    for number, run in enumerate(others, start=2):
        differences = setting_differences(base.results, run.results)
        if differences:
            section.blocks.append(
                Note(
                    f"runs 1 and {number} differ in more than the model, so their "
                    f"differences mix both: {'; '.join(differences)}",
                    label="Warning",
                )
            )
    return section


# Building and rendering ------------------------------------------------------------------


def build_sections(runs: list[Run]) -> list[Section]:
    """Return the report's sections: a comparison first when there are several runs."""
    sections = []
    if len(runs) > 1:
        sections.append(comparison_section(runs))
    for number, run in enumerate(runs, start=1):
        prefix = f"Run {number}: {run.label} — " if len(runs) > 1 else ""
        if run.command == "ppl":
            parts = ppl_sections(run)
        elif run.command == "kl":
            parts = kl_sections(run)
        elif run.command == "drift":
            parts = drift_sections(run)
        else:
            parts = [Section("Run", [Note(f"unknown command {run.command!r}; skipped")])]
        for part in parts:
            part.title = prefix + part.title
        sections += parts
    return sections


def report_title(runs: list[Run]) -> str:
    if len(runs) == 1:
        return f"lmeval {runs[0].command} report: {runs[0].label}"
    return f"lmeval report: {len(runs)} runs"


def write_report(run_dirs: list[str], output: str | Path) -> tuple[Path, Path]:
    """Write the HTML report to ``output`` and the Markdown report beside it.

    The Markdown file has the HTML file's name with ``.md`` and its figures go to a
    ``NAME_files`` directory beside it.

    Returns:
        The paths of the HTML and Markdown files.
    """
    runs = [load_run(path) for path in expand_series(run_dirs)]
    sections = build_sections(runs)
    title = report_title(runs)
    sources = [str(run.path) for run in runs]
    html_path = Path(output)
    if html_path.is_dir():
        html_path = html_path / "report.html"
    markdown_path = html_path.with_suffix(".md")
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(title, sources, sections), encoding="utf-8")
        images = markdown_path.parent / f"{markdown_path.stem}_files"
        markdown_path.write_text(
            render_markdown(title, sources, sections, images), encoding="utf-8"
        )
    except OSError as error:
        raise ConfigError(
            f"cannot write the report to {str(html_path)!r}: {error}; pass --output "
            "with a writable path"
        ) from error
    return html_path, markdown_path


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd;
       padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left;
         vertical-align: top; max-width: 640px; overflow-wrap: anywhere; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: .6em 0; }
.note { color: #8a5a00; background: #fff7e0; padding: .3em .6em; border-radius: 3px; }
.tokens { list-style: none; padding: 0; font-size: .9em; }
.tokens li { margin: .35em 0; padding: .3em .5em; border-left: 3px solid #ddd; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.target { font-weight: bold; outline: 1px solid #b00; }
.label { color: #555; margin-right: .6em; } .detail { color: #666; font-size: .85em; }
"""


def render_html(title: str, sources: list[str], sections: list[Section]) -> str:
    """Render the sections as one HTML page with inline CSS and base64 PNG figures."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Runs: " + ", ".join(f"<code>{html.escape(s)}</code>" for s in sources) + "</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_block(block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{block.label}: {html.escape(block.text)}</p>'
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        alt = html.escape(block.title)
        return f'<img alt="{alt}" title="{alt}" src="data:image/png;base64,{data}">'
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Tokens):
        return _html_tokens(block)
    raise TypeError(f"unknown block {type(block).__name__}")


#: Tables with more rows than this are folded into a <details> element.
MAX_OPEN_ROWS = 12


def _html_table(table: Table) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header)]
    for index, row in enumerate(table.rows):
        key = table.keys[index] if table.keys else None
        cells = []
        for column, cell in enumerate(row):
            attributes = ' class="num"' if _is_number(cell) and not table.key_value else ""
            if key is not None and column == 1:
                attributes += f' data-key="{html.escape(key)}"'
            cells.append(f"<td{attributes}>{html.escape(cell)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    if len(table.rows) > MAX_OPEN_ROWS and not table.keys and not table.key_value:
        lines.insert(0, f"<details><summary>table of {len(table.rows)} rows</summary>")
        lines.append("</details>")
    return "\n".join(lines)


def _html_tokens(block: Tokens) -> str:
    lines = ['<ul class="tokens">']
    for item in block.items:
        context = "".join(
            f'<span style="background:{loss_colour(nll, block.max_nll)}">{html.escape(text)}</span>'
            if nll is not None
            else html.escape(text)
            for text, nll in item.pieces
        )
        token = (
            f'<span class="target" style="background:{loss_colour(item.token_nll, block.max_nll)}"'
            f">{html.escape(item.token)}</span>"
        )
        lines.append(
            f'<li><span class="label">{html.escape(item.label)}</span>'
            f'<span class="context">{context}{token}</span><br>'
            f'<span class="detail">{html.escape(item.detail)}</span></li>'
        )
    lines.append("</ul>")
    return "\n".join(lines)


def loss_colour(nll: float, max_nll: float) -> str:
    """Map an NLL to a CSS colour from white (0) to red (``max_nll`` or more)."""
    if not math.isfinite(nll):
        fraction = 1.0
    else:
        fraction = min(1.0, max(0.0, nll / max_nll)) if max_nll > 0 else 0.0
    # Alpha rather than a colormap keeps the text readable at every level.
    return f"rgba(220, 40, 30, {0.08 + 0.62 * fraction:.2f})"


def render_markdown(title: str, sources: list[str], sections: list[Section], images: Path) -> str:
    """Render the sections as Markdown, writing the figures as PNG files into ``images``."""
    lines = [f"# {title}", "", "Runs: " + ", ".join(f"`{s}`" for s in sources), ""]
    count = 0
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Image):
                count += 1
                images.mkdir(parents=True, exist_ok=True)
                name = f"figure-{count:02d}.png"
                (images / name).write_bytes(block.png)
                lines.append(f"![{block.title}]({images.name}/{name})")
            else:
                lines.append(_markdown_block(block))
            lines.append("")
    return "\n".join(lines)


def _markdown_block(block) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Note):
        return f"> {block.label}: {block.text}"
    if isinstance(block, Table):
        lines = [
            "| " + " | ".join(_markdown_cell(h) for h in block.header) + " |",
            "|" + "|".join("---" for _ in block.header) + "|",
        ]
        lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Tokens):
        lines = []
        for item in block.items:
            context = "".join(text for text, _ in item.pieces)
            lines.append(
                f"- {item.label}: `{_inline(context)}` **`{_inline(item.token)}`** — {item.detail}"
            )
        return "\n".join(lines)
    raise TypeError(f"unknown block {type(block).__name__}")


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """Make text fit inside a Markdown code span: no backticks, newlines shown as ⏎."""
    return text.replace("`", "'").replace("\n", "⏎")


# Formatting --------------------------------------------------------------------------


def format_value(value: float | None) -> str:
    """Format a metric as the headline table does: 4 decimals, n/a when missing."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}"


def format_significant(value: float | None) -> str:
    """Format a value that may be far below 1, such as a KL divergence, to 4 digits."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def format_interval(interval: list[float] | None) -> str:
    if not interval or any(x is None or not math.isfinite(x) for x in interval):
        return "n/a"
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def format_count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def format_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def model_label(model: dict) -> str:
    parts = [str(model.get("spec"))]
    details = [str(model[key]) for key in ("dtype", "device") if model.get(key)]
    if details:
        parts.append(f"({', '.join(details)})")
    return " ".join(parts)


def data_label(data: dict) -> str:
    source = data.get("source") or {}
    files = [str(file.get("path")) for file in source.get("files", [])]
    label = data.get("task") or ", ".join(files) or source.get("path") or source.get("name")
    label = str(label or "?")
    if data.get("limit"):
        label += f" (first {data['limit']})"
    return label


def protocol_label(protocol: dict) -> str:
    parts = [str(protocol.get("name")), f"window {protocol.get('window_size')}"]
    if protocol.get("stride"):
        parts.append(f"stride {protocol['stride']}")
    if protocol.get("prefix_token") is not None:
        parts.append(f"prefix token {protocol['prefix_token']!r}")
    if "bos_replaces_first_token" in protocol:
        parts.append(f"BOS replaces first token: {protocol['bos_replaces_first_token']}")
    return ", ".join(parts)


def _stderr(summary: dict) -> str:
    stderr = _float(summary.get("stderr"))
    return "n/a" if stderr is None else format_significant(stderr)


def _float(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", "").lstrip("+"))
    except ValueError:
        return False
    return True


# Command line --------------------------------------------------------------------------


def add_report_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report",
        help="write an HTML and Markdown report of one or more runs",
        description="Write a self-contained HTML report (figures embedded, no network "
        "needed to view it) of ppl, kl or drift runs, and the same content as Markdown "
        "beside it. With several runs, the report starts with a comparison table.",
        epilog="examples:\n  lmeval report results/wt2\n"
        "  lmeval report results/base results/finetuned --output compare.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directory of a run")
    parser.add_argument(
        "--output",
        help="HTML file to write (default RUN_DIR/report.html of the first run); the "
        "Markdown goes beside it with the suffix .md",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.set_defaults(handler=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    for path in args.runs:
        if not Path(path).is_dir():
            raise ConfigError(f"{path!r} is not a directory; pass the --output directory of a run")
    output = args.output or str(Path(args.runs[0]) / "report.html")
    html_path, markdown_path = write_report(args.runs, output)
    print(html_path)
    print(markdown_path)
    return 0
