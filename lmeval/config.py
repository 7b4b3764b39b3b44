"""Typed run configuration: defaults, YAML config files and command-line overrides.

A config file is plain YAML data whose keys are the long option names, with hyphens
or underscores (``window-size`` or ``window_size``). Values from the command line
override the file, and the file overrides the defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmeval.errors import ConfigError
from lmeval.windows import PROTOCOLS

#: Weight dtypes a run may request (``--dtype``).
DTYPES = ("float32", "bfloat16", "float16")
#: Sides on which a batch of windows is padded (``--padding-side``).
PADDING_SIDES = ("right", "left")


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


def load_config_file(
    path: str | Path,
    config_class: type = RunConfig,
    types: Mapping[str, type] | None = None,
) -> dict[str, Any]:
    """Read and validate a YAML config file; report every problem at once.

    Args:
        path: the YAML file.
        config_class: the dataclass whose fields are the valid keys (default
            :class:`RunConfig`, the options of ``lmeval ppl``).
        types: the type (int, bool or list) of each key whose value is not a string;
            None means the types of :class:`RunConfig`.

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
    field_names = [f.name for f in dataclasses.fields(config_class) if f.name != "extra"]
    types = _TYPES if types is None else types
    values, problems = {}, []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in field_names:
            problems.append(f"unknown key {key!r}")
            continue
        problem = _type_problem(name, value, types)
        if problem:
            problems.append(problem)
            continue
        if types.get(name) is list:
            value = [value] if isinstance(value, str) else [str(v) for v in value]
        values[name] = value
    if problems:
        known = ", ".join(name.replace("_", "-") for name in field_names)
        raise ConfigError(f"config file {str(path)!r}: {'; '.join(problems)} (valid keys: {known})")
    return values


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """Merge defaults, file values and command-line values (highest priority last)."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    return RunConfig(**merged)


def validate_config(config: RunConfig) -> None:
    """Check the options that need no model or data, and report every problem at once.

    Values from a config file do not pass through the command line's own checks,
    so choices and ranges are checked here for both.

    Raises:
        ConfigError: one line listing every invalid option.
    """
    problems = []
    if not config.model:
        problems.append("no model given; pass --model (e.g. --model smollm2-135m)")
    problems += _choice_problems(config)
    problems += _range_problems(config)
    if config.stride is not None and config.protocol != "sliding":
        problems.append(
            f"--stride applies to the sliding protocol, not {config.protocol!r}; "
            "drop --stride or pass --protocol sliding"
        )
    if config.resume and not config.output:
        problems.append("--resume needs --output DIR, the directory of the run to continue")
    if problems:
        raise ConfigError("; ".join(problems))


def _choice_problems(config: RunConfig) -> list[str]:
    choices = {"protocol": PROTOCOLS, "padding_side": PADDING_SIDES, "dtype": DTYPES}
    problems = []
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            option = name.replace("_", "-")
            problems.append(f"invalid --{option} {value!r}; use one of {', '.join(allowed)}")
    return problems


def _range_problems(config: RunConfig) -> list[str]:
    minimums = {
        "limit": 1,
        # A llama-cpp chunk of W tokens scores W - 1 - W // 2 of them: none when W is 2.
        "window_size": 3 if config.protocol == "llama-cpp" else 1,
        "stride": 1,
        "logits_chunk_size": 1,
        "threads": 1,
    }
    problems = []
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if value is not None and value < minimum:
            where = f" with --protocol {config.protocol}" if name == "window_size" else ""
            option = name.replace("_", "-")
            problems.append(f"--{option} must be at least {minimum}{where}, got {value}")
    stride, window_size = config.stride, config.window_size
    if stride is not None and window_size is not None and stride > window_size:
        problems.append(
            f"--stride {stride} is above --window-size {window_size}; a sliding window "
            "cannot advance by more than its size"
        )
    batch_size = config.batch_size
    if batch_size != "auto":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            problems.append(
                f"--batch-size must be a positive integer or 'auto', got {batch_size!r}"
            )
        elif batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {batch_size}")
    return problems


def _type_problem(name: str, value: Any, types: Mapping[str, type]) -> str | None:
    expected = types.get(name)
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
