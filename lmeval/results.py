"""Run outputs: results.json with provenance, documents.jsonl, resume and the table.

An output directory holds ``config.json`` (written when the run starts: what the run
is, so a later run can tell whether it may resume there), ``documents.jsonl`` (one row
per finished document, flushed as it is written) and ``results.json`` (written last).
In a run over several ranks, rank N > 0 appends its rows to ``documents.rankN.jsonl``
(see :class:`RankRows`); rank 0 merges them into documents.jsonl at the end, and a
resumed run reads them too, so a killed run keeps every finished row.
JSON files are written to a temporary file and renamed, so a crash never leaves a
truncated one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import secrets
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from lmeval.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DOCUMENTS_FILE = "documents.jsonl"
#: Rows of rank N > 0 of a sharded run, before rank 0 merges them into DOCUMENTS_FILE.
RANK_DOCUMENTS_GLOB = "documents.rank*.jsonl"
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


def check_output_directory(path: str | Path) -> None:
    """Create ``path`` if needed and check that files can be written there.

    Runs before the model is loaded, so that a wrong --output fails at once rather
    than after a load that can take minutes.

    Raises:
        ConfigError: ``path`` is a file, or cannot be created or written to.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {str(path)!r} is a file, not a directory")
    probe = path / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"cannot write to --output {str(path)!r}: {error}; choose a writable directory"
        ) from error


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename."""

    def write(file: TextIO) -> None:
        json.dump(value, file, indent=2, allow_nan=False, default=_jsonable)
        file.write("\n")

    replace_atomically(path, write)


def replace_atomically(path: Path, write: Callable[[TextIO], None]) -> None:
    """Replace ``path`` by a file that ``write`` fills, through a temporary file.

    The temporary file sits next to ``path``, is flushed to disk and then renamed
    over it, so readers and a later run see the old file or the new one, never a
    part. It is opened like any new file, so it gets the umask's permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
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
        ConfigError: when the directory contains another run's outputs, or this
            run's and ``resume`` is off, or outputs without a config.json, or when it
            cannot be written.
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
            self._check_stored_run(_read_json(config_path), key, resume)
            self.finished_rows = self._read_all_rows()
        else:
            self._check_no_outputs()
            if resume:
                logger.warning(
                    "--resume: %s contains no run to resume, so a new run starts there",
                    self.path,
                )
        try:
            write_json_atomic(config_path, {"fingerprint": key, "run": self.run})
            self._rewrite_rows()
            self._remove_rank_files()
        except OSError as error:
            raise ConfigError(
                f"cannot write to --output {str(self.path)!r}: {error}; choose a writable directory"
            ) from error

    def _check_stored_run(self, stored: dict, key: str, resume: bool) -> None:
        if stored.get("fingerprint") != key:
            differences = run_differences(stored.get("run") or {}, self.run)
            detail = f" ({'; '.join(differences)})" if differences else ""
            raise ConfigError(
                f"--output {str(self.path)!r} contains the results of a different "
                f"configuration{detail}; choose another --output directory or delete "
                "this one"
            )
        if not resume:
            raise ConfigError(
                f"--output {str(self.path)!r} already holds results of this run; "
                "pass --resume to continue it, or choose another --output"
            )

    def _check_no_outputs(self) -> None:
        """Reject a directory with outputs that no config.json describes."""
        present = [name for name in (DOCUMENTS_FILE, RESULTS_FILE) if (self.path / name).exists()]
        if present:
            raise ConfigError(
                f"--output {str(self.path)!r} contains {' and '.join(present)} but no "
                f"{CONFIG_FILE}, so it cannot be resumed or overwritten safely; choose "
                "another --output or delete those files"
            )

    def _read_all_rows(self) -> list[dict]:
        """Read the rows of documents.jsonl and of every rank's file, each index once."""
        rows, seen = [], set()
        paths = [self.path / DOCUMENTS_FILE, *sorted(self.path.glob(RANK_DOCUMENTS_GLOB))]
        for path in paths:
            for row in read_rows(path):
                if row["index"] not in seen:
                    seen.add(row["index"])
                    rows.append(row)
        return rows

    def _remove_rank_files(self) -> None:
        # Only after their rows are in documents.jsonl: a kill before this line leaves
        # rows in both files, which _read_all_rows reads once.
        for path in self.path.glob(RANK_DOCUMENTS_GLOB):
            path.unlink()

    def merge_rows(self, rows: Iterable[dict]) -> None:
        """Replace documents.jsonl by ``rows`` sorted by index and drop the rank files.

        Rank 0 of a sharded run calls this with the rows gathered from every rank.
        """
        self.close()
        self.finished_rows = sorted(rows, key=lambda row: row["index"])
        self._rewrite_rows()
        self._remove_rank_files()

    def _rewrite_rows(self) -> None:
        """Drop a partly written last row (from a killed run) before appending.

        The rows are rewritten through a temporary file and a rename, so a run killed
        here keeps the rows of the run it resumes.
        """
        rows_path = self.path / DOCUMENTS_FILE

        def write(file: TextIO) -> None:
            for row in self.finished_rows:
                file.write(json.dumps(row, allow_nan=False) + "\n")

        replace_atomically(rows_path, write)
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


class RankRows:
    """The rows file of one rank N > 0 of a sharded run, ``documents.rankN.jsonl``.

    Open it only after rank 0 has prepared the directory, which merges and removes
    the rank files of the run it resumes.
    """

    def __init__(self, path: str | Path, rank: int) -> None:
        self.path = Path(path) / f"documents.rank{rank}.jsonl"
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, row: dict) -> None:
        """Append one document row and flush it to disk."""
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def finished_results(path: str | Path, run: dict[str, Any]) -> dict | None:
    """Return the results.json in ``path`` when the run there is ``run`` and finished.

    The run is the same when config.json stores the fingerprint of ``run``. Otherwise,
    or without a readable results.json, return None.
    """
    path = Path(path)
    stored = _read_json(path / CONFIG_FILE)
    if stored.get("fingerprint") != fingerprint(run):
        return None
    results = _read_json(path / RESULTS_FILE)
    return results or None


def stored_fingerprint(path: str | Path) -> str | None:
    """Return the fingerprint in ``path``/config.json, or None without a readable one."""
    return _read_json(Path(path) / CONFIG_FILE).get("fingerprint")


def remove_unfinished(path: str | Path) -> None:
    """Delete the config.json and rows of a run that stopped before its results.json."""
    path = Path(path)
    for name in (CONFIG_FILE, DOCUMENTS_FILE):
        (path / name).unlink(missing_ok=True)
    for rows in path.glob(RANK_DOCUMENTS_GLOB):
        rows.unlink()


def run_differences(stored: dict, current: dict, max_listed: int = 3) -> list[str]:
    """List the values that differ between two run identities, as ``key: stored -> now``.

    Nested keys are joined with dots (``protocol.window_size``). At most
    ``max_listed`` differences are listed, then how many more there are.
    """
    # A JSON round trip makes the current run comparable with the stored one.
    current = json.loads(json.dumps(current, default=_jsonable))
    old, new = _flatten(stored), _flatten(current)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    listed = [f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}" for key in keys]
    if len(listed) > max_listed:
        listed = [*listed[:max_listed], f"{len(listed) - max_listed} more"]
    return listed


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=_jsonable)
    return text if len(text) <= width else text[: width - 3] + "..."


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
    source = data.get("source") or {}
    files = [file["path"] for file in source.get("files", [])]
    label = data.get("task") or ", ".join(files) or source.get("path") or source.get("name") or "?"
    if data.get("limit"):
        label += f" (first {data['limit']})"
    return str(label)


def _protocol_label(protocol: dict) -> str:
    parts: Iterable[str] = [protocol["name"], f"window {protocol['window_size']}"]
    if protocol.get("stride"):
        parts = [*parts, f"stride {protocol['stride']}"]
    return ", ".join(parts)
