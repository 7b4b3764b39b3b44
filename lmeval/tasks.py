"""Task files: YAML data that names a corpus, how documents are formed and normalised.

A task is pure data, validated into :class:`Task`; unknown keys are rejected and every
problem is reported in one error. Task files are found by name in the package's
``tasks/`` folder (installed wheel) or in the repository's top-level ``tasks/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

import lmeval
from lmeval.errors import ConfigError
from lmeval.normalize import NORMALIZATIONS

SAMPLE_BY: tuple[str, ...] = ("document", "line", "paragraph", "wikitext-article")
"""Ways a plain-text file is cut into documents.

``document`` keeps the whole file, byte for byte. ``line`` makes one document per
line (a ``\\r`` before the ``\\n`` belongs to the line break, and empty lines are
kept as empty documents). ``paragraph`` makes one document per run of non-blank
lines. ``wikitext-article`` starts a document at every WikiText article heading.
"""

FORMATS: tuple[str, ...] = ("text", "json", "csv", "parquet")
"""Local file formats. Structured formats give one document per row."""

BUILTINS: tuple[str, ...] = ("pydoc-topics",)
"""Corpora embedded in the Python installation, for tasks with ``builtin``."""

TITLES: tuple[str, ...] = ("none", "wikitext-heading")
"""Title rules of a task: no title, or the WikiText heading a document opens with."""


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face Hub: one document per row of ``split``."""

    path: str
    config: str | None = None
    split: str = "test"
    text_field: str = "text"


@dataclass(frozen=True)
class LocalSource:
    """Reading rules for the files passed to a task with ``data_files``.

    ``sample_by`` (one of :data:`SAMPLE_BY`) applies to the ``text`` format and
    ``text_field`` to the structured formats.
    """

    format: str
    sample_by: str = "document"
    text_field: str = "text"


@dataclass(frozen=True)
class Task:
    """A validated task file. ``builtin`` excludes ``hub`` and ``local``."""

    name: str
    description: str = ""
    hub: HubSource | None = None
    local: LocalSource | None = None
    builtin: str | None = None
    normalization: tuple[str, ...] = ("none",)
    titles: str = "none"


class _Problems:
    """Collects every problem of a task file so that one error can list them all."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check_keys(self, mapping: dict, allowed: Sequence[str], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                self.messages.append(
                    f"unknown key {where}{key!r} (valid keys: {', '.join(allowed)})"
                )

    def string(self, mapping: dict, key: str, where: str, default: str) -> str:
        """Return ``mapping[key]`` if it is a non-empty string, else ``default``."""
        if key not in mapping:
            return default
        value = mapping[key]
        if not isinstance(value, str) or not value:
            self.messages.append(f"{where}{key} must be a non-empty string, got {value!r}")
            return default
        return value

    def optional_string(self, mapping: dict, key: str, where: str) -> str | None:
        if mapping.get(key) is None:
            return None
        return self.string(mapping, key, where, "") or None

    def required_string(self, mapping: dict, key: str, where: str) -> str:
        if key not in mapping:
            self.messages.append(f"{where}{key} is missing")
        return self.string(mapping, key, where, "")

    def choice(
        self, mapping: dict, key: str, where: str, choices: Sequence[str], default: str
    ) -> str:
        value = self.string(mapping, key, where, default)
        if value not in choices:
            self.messages.append(f"{where}{key} is {value!r}, expected one of {', '.join(choices)}")
            return default
        return value

    def section(self, mapping: dict, key: str) -> dict | None:
        value = mapping.get(key)
        if value is None or isinstance(value, dict):
            return value
        self.messages.append(f"{key} must be a mapping, got {value!r}")
        return None


def _parse_hub(section: dict, problems: _Problems) -> HubSource:
    problems.check_keys(section, ("path", "config", "split", "text_field"), "hub.")
    return HubSource(
        path=problems.required_string(section, "path", "hub."),
        config=problems.optional_string(section, "config", "hub."),
        split=problems.string(section, "split", "hub.", "test"),
        text_field=problems.string(section, "text_field", "hub.", "text"),
    )


def _parse_local(section: dict, problems: _Problems) -> LocalSource:
    problems.check_keys(section, ("format", "sample_by", "text_field"), "local.")
    if "format" not in section:
        problems.messages.append(f"local.format is missing: use one of {', '.join(FORMATS)}")
    file_format = problems.choice(section, "format", "local.", FORMATS, "text")
    if file_format != "text" and "sample_by" in section:
        problems.messages.append(
            f"local.sample_by applies to the text format only, not {file_format!r}"
        )
    return LocalSource(
        format=file_format,
        sample_by=problems.choice(section, "sample_by", "local.", SAMPLE_BY, "document"),
        text_field=problems.string(section, "text_field", "local.", "text"),
    )


def _parse_normalization(raw: dict, problems: _Problems) -> tuple[str, ...]:
    names = raw.get("normalization", ["none"])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.messages.append(f"normalization must be a list of names, got {names!r}")
        return ()
    for name in names:
        if name not in NORMALIZATIONS:
            problems.messages.append(
                f"unknown normalization {name!r} (valid names: {', '.join(NORMALIZATIONS)})"
            )
    return tuple(names)


def _check_sources(raw: dict, problems: _Problems) -> None:
    has_files = raw.get("hub") is not None or raw.get("local") is not None
    if "builtin" in raw and has_files:
        problems.messages.append("builtin cannot be combined with hub or local")
    if "builtin" not in raw and not has_files:
        problems.messages.append("the task needs a builtin, hub or local section")


_TASK_KEYS = ("name", "description", "hub", "local", "builtin", "normalization", "titles")


def parse_task(raw: object, source: str) -> Task:
    """Validate the parsed YAML ``raw`` of a task file into a :class:`Task`.

    Raises:
        ConfigError: listing every problem found, with ``source`` as the file name.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid task file {source}: expected a mapping of keys")
    problems = _Problems()
    problems.check_keys(raw, _TASK_KEYS, "")
    _check_sources(raw, problems)
    hub = problems.section(raw, "hub")
    local = problems.section(raw, "local")
    builtin = None
    if "builtin" in raw:
        builtin = problems.choice(raw, "builtin", "", BUILTINS, BUILTINS[0])
    task = Task(
        name=problems.required_string(raw, "name", ""),
        description=problems.string(raw, "description", "", ""),
        hub=None if hub is None else _parse_hub(hub, problems),
        local=None if local is None else _parse_local(local, problems),
        builtin=builtin,
        normalization=_parse_normalization(raw, problems),
        titles=problems.choice(raw, "titles", "", TITLES, "none"),
    )
    if problems.messages:
        raise ConfigError(f"invalid task file {source}: {'; '.join(problems.messages)}")
    return task


def task_dirs() -> list[Path]:
    """Return the folders searched for task files, in search order.

    An installed wheel has them inside the package, and a source checkout in the
    top-level ``tasks/`` folder next to the package.
    """
    package = Path(lmeval.__file__).parent
    return [package / "tasks", package.parent / "tasks"]


def available_tasks() -> list[str]:
    """Return the sorted names of the task files found in :func:`task_dirs`."""
    names = {path.stem for folder in task_dirs() for path in folder.glob("*.yaml")}
    return sorted(names)


def find_task_file(task: str) -> Path:
    """Return the task file for a task name or for a path to a YAML file."""
    if task.endswith((".yaml", ".yml")) or "/" in task:
        path = Path(task)
        if path.is_dir():
            raise ConfigError(f"--task {task!r} is a directory; pass a task name or a YAML file")
        if not path.is_file():
            raise ConfigError(f"task file not found: {task}")
        return path
    for folder in task_dirs():
        path = folder / f"{task}.yaml"
        if path.is_file():
            return path
    raise ConfigError(
        f"unknown task {task!r}: use one of {', '.join(available_tasks())} "
        "or a path to a task YAML file"
    )


def load_task(task: str) -> Task:
    """Find, parse and validate a task given by name or by YAML path."""
    path = find_task_file(task)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        message = str(error).replace("\n", " ")
        raise ConfigError(f"task file {path} is not valid YAML: {message}") from error
    return parse_task(raw, str(path))
