"""Run outputs: results.json with provenance, documents.jsonl, resume and the table.

An output directory holds ``config.json`` (written when the run starts: what the run
is, so a later run can tell whether it may resume there), ``documents.jsonl`` (one row
per finished document, flushed as it is written) and ``results.json`` (written last).
JSON files are written to a temporary file and renamed, so a crash never leaves a
truncated one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from lmeval.errors import ConfigError

CONFIG_FILE = "config.json"
DOCUMENTS_FILE = "documents.jsonl"
RESULTS_FILE = "results.json"
LIBRARIES = (
    "lmeval",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "numpy",
    "gguf",
)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=2, allow_nan=False, default=_jsonable)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fingerprint(run: dict[str, Any]) -> str:
    """Return a sha256 over everything that changes a run's numbers."""
    text = json.dumps(run, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str | None]:
    """Return installed versions of the libraries that affect results."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def environment() -> dict[str, Any]:
    """Describe the machine a run used."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class OutputDirectory:
    """Prepare an output directory, append document rows and write the results.

    Args:
        path: the directory.
        run: the run's identity (config, model, data); stored in config.json.
        resume: continue a run whose config.json matches ``run``.

    Raises:
        ConfigError: when the directory holds another run, or holds this run and
            ``resume`` is off.
    """

    def __init__(self, path: str | Path, run: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        self.run = run
        self.finished_rows: list[dict] = []
        self._file: TextIO | None = None
        self._prepare(resume)

    def _prepare(self, resume: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--output {str(self.path)!r} is a file, not a directory")
        config_path = self.path / CONFIG_FILE
        key = fingerprint(self.run)
        if config_path.exists():
            stored = _read_json(config_path)
            if stored.get("fingerprint") != key:
                raise ConfigError(
                    f"--output {str(self.path)!r} holds results of a different "
                    "configuration (model, data or scoring options differ); choose "
                    "another --output directory or delete this one"
                )
            if not resume:
                raise ConfigError(
                    f"--output {str(self.path)!r} already holds results of this run; "
                    "pass --resume to continue it, or choose another --output"
                )
            self.finished_rows = read_rows(self.path / DOCUMENTS_FILE)
        elif resume and (self.path / DOCUMENTS_FILE).exists():
            raise ConfigError(
                f"--output {str(self.path)!r} has no {CONFIG_FILE}, so it cannot be "
                "resumed; choose another --output"
            )
        write_json_atomic(config_path, {"fingerprint": key, "run": self.run})
        self._rewrite_rows()

    def _rewrite_rows(self) -> None:
        """Drop a partly written last row (from a killed run) before appending."""
        rows_path = self.path / DOCUMENTS_FILE
        with open(rows_path, "w", encoding="utf-8") as file:
            for row in self.finished_rows:
                file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file = open(rows_path, "a", encoding="utf-8")  # noqa: SIM115

    @property
    def finished_indices(self) -> set[int]:
        return {row["index"] for row in self.finished_rows}

    def append(self, row: dict) -> None:
        """Append one document row and flush it to disk."""
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write_results(self, results: dict) -> None:
        self.close()
        write_json_atomic(self.path / RESULTS_FILE, results)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_rows(path: Path) -> list[dict]:
    """Read documents.jsonl, ignoring a truncated last line."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_table(results: dict) -> str:
    """Render the headline metrics of a ppl results object as a text table."""
    m = results["metrics"]
    rows = [
        ("perplexity", _with_interval(m, "perplexity")),
        ("mean NLL (nats/token)", _with_interval(m, "mean_nll")),
        ("bits per byte", _with_interval(m, "bits_per_byte")),
        ("byte perplexity", _with_interval(m, "byte_perplexity")),
        ("word perplexity", _with_interval(m, "word_perplexity")),
        ("accuracy (top-1)", _with_interval(m, "accuracy")),
        ("tokens", f"{m['num_tokens']:,}"),
        ("words / bytes", f"{m['num_words']:,} / {m['num_bytes']:,}"),
        ("documents (skipped)", f"{m['num_documents']:,} ({m['num_skipped']:,})"),
    ]
    protocol = results["protocol"]
    timing = results["timing"]
    rows += [
        ("model", f"{results['model']['spec']} ({results['model']['dtype']})"),
        ("data", _data_label(results["data"])),
        ("protocol", _protocol_label(protocol)),
        ("tokens/s", f"{timing['tokens_per_second']:,.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _with_interval(m: dict, name: str) -> str:
    value = m.get(name)
    if value is None:
        return "n/a"
    interval = m.get(f"{name}_interval")
    text = f"{value:.4f}"
    if interval is not None and all(math.isfinite(x) for x in interval):
        text += f"  [{interval[0]:.4f}, {interval[1]:.4f}]"
    return text


def _data_label(data: dict) -> str:
    label = data.get("task") or data.get("source") or "?"
    if data.get("limit"):
        label += f" (first {data['limit']})"
    return str(label)


def _protocol_label(protocol: dict) -> str:
    parts: Iterable[str] = [protocol["name"], f"window {protocol['window_size']}"]
    if protocol.get("stride"):
        parts = [*parts, f"stride {protocol['stride']}"]
    return ", ".join(parts)
