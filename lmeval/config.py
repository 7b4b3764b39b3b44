"""Typed run configuration: defaults, YAML config files and command-line overrides.

A config file is plain YAML data whose keys are the long option names, with hyphens
or underscores (``window-size`` or ``window_size``). Values from the command line
override the file, and the file overrides the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmeval.errors import ConfigError


@dataclass
class RunConfig:
    """Every option of ``lmeval ppl``; see ``lmeval ppl --help`` for their meaning."""

    model: str | None = None
    task: str | None = None
    data: str | None = None
    data_files: list[str] | None = None
    text_field: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    sample_by: str | None = None
    limit: int | None = None
    protocol: str = "rolling"
    window_size: int | None = None
    stride: int | None = None
    batch_size: int | str = 1
    logits_chunk_size: int | None = None
    padding_side: str = "right"
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    threads: int | None = None
    output: str | None = None
    resume: bool = False
    json: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "extra"}
_TYPES = {
    "data_files": list,
    "limit": int,
    "window_size": int,
    "stride": int,
    "logits_chunk_size": int,
    "threads": int,
    "trust_remote_code": bool,
    "resume": bool,
    "json": bool,
    "progress": bool,
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file; report every problem at once.

    Raises:
        ConfigError: when the file is missing, is not a YAML mapping, or has unknown
            keys or values of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; check the --config path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of option: value")
    values, problems = {}, []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            problems.append(f"unknown key {key!r}")
            continue
        problem = _type_problem(name, value)
        if problem:
            problems.append(problem)
            continue
        if name == "data_files":
            value = [value] if isinstance(value, str) else [str(v) for v in value]
        values[name] = value
    if problems:
        known = ", ".join(name.replace("_", "-") for name in _FIELDS)
        raise ConfigError(f"config file {str(path)!r}: {'; '.join(problems)} (valid keys: {known})")
    return values


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """Merge defaults, file values and command-line values (highest priority last)."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    return RunConfig(**merged)


def _type_problem(name: str, value: Any) -> str | None:
    expected = _TYPES.get(name)
    if value is None:
        return None
    if expected is bool and not isinstance(value, bool):
        return f"{name.replace('_', '-')} must be true or false, got {value!r}"
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name.replace('_', '-')} must be an integer, got {value!r}"
    if expected is list and not isinstance(value, list | str):
        return f"{name.replace('_', '-')} must be a list of paths, got {value!r}"
    if name == "batch_size" and not (
        (isinstance(value, int) and not isinstance(value, bool)) or value == "auto"
    ):
        return f"batch-size must be an integer or 'auto', got {value!r}"
    if expected is None and name != "batch_size" and not isinstance(value, str):
        return f"{name.replace('_', '-')} must be a string, got {value!r}"
    return None
