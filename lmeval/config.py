"""Typed run configuration: defaults, YAML config files and command-line overrides.

A config file is plain YAML data whose keys are the long option names, with hyphens
or underscores (``window-size`` or ``window_size``). Values from the command line
override the file, and the file overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import re
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
#: Placement strategies of accelerate for ``--device-map`` (from_pretrained's device_map).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: Units of a ``--max-memory`` size, in bytes. GB and MB are decimal and GiB and MiB binary,
#: as in accelerate 1.16 (``accelerate.utils.convert_file_size_to_int``).
MEMORY_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_MEMORY_EXAMPLE = "e.g. --max-memory cpu=8GiB 0=20GiB"


@dataclass
class RunConfig:
    """Every option of ``lmeval ppl``; see ``lmeval ppl --help`` for their meaning."""

    model: str | list[str] | None = None
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
    device_map: str | None = None
    max_memory: list[str] | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    threads: int | None = None
    compile: bool = False
    output: str | None = None
    resume: bool = False
    json: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


_TYPES = {
    # Several models (or a glob) score each checkpoint; see lmeval.checkpoints.
    "model": list,
    "data_files": list,
    "max_memory": list,
    "limit": int,
    "window_size": int,
    "stride": int,
    "logits_chunk_size": int,
    "threads": int,
    "trust_remote_code": bool,
    "compile": bool,
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
    if path.is_dir():
        raise ConfigError(f"--config {str(path)!r} is a directory; pass a YAML file")
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
    problems += placement_problems(config.device, config.device_map, config.max_memory)
    if problems:
        raise ConfigError("; ".join(problems))


def placement_problems(
    device: str | None, device_map: str | None, max_memory: list[str] | None
) -> list[str]:
    """Check --device-map and --max-memory, which model and kl configs share."""
    problems = []
    if device_map is not None and device_map not in DEVICE_MAPS:
        problems.append(f"invalid --device-map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    if device_map is not None and device not in (None, "cpu", "auto"):
        problems.append(
            f"--device {device} and --device-map {device_map} both place the model; "
            "drop --device, since the device map chooses the devices"
        )
    if max_memory and device_map is None:
        problems.append(
            "--max-memory limits what --device-map puts on each device; add --device-map auto"
        )
    if max_memory:
        try:
            parse_max_memory(max_memory)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def parse_max_memory(entries: list[str] | str) -> dict[int | str, int]:
    """Parse ``DEVICE=SIZE`` entries into the max_memory mapping of from_pretrained.

    DEVICE is ``cpu``, ``mps``, a CUDA index ``N`` or ``cuda:N``; SIZE is a number of
    bytes or a number with a unit (KB, MB, GB, TB decimal; KiB, MiB, GiB, TiB binary).
    Returns sizes in bytes, keyed by ``"cpu"``, ``"mps"`` or the integer CUDA index.

    Raises:
        ConfigError: on an entry that is not ``DEVICE=SIZE``, an unknown device or
            unit, or a device given twice.
    """
    if isinstance(entries, str):
        entries = entries.split()
    limits: dict[int | str, int] = {}
    for entry in entries:
        device, separator, size = entry.partition("=")
        if not separator or not device or not size:
            raise ConfigError(
                f"invalid --max-memory entry {entry!r}: use DEVICE=SIZE, {_MEMORY_EXAMPLE}"
            )
        key = _memory_device(device.strip(), entry)
        if key in limits:
            raise ConfigError(
                f"--max-memory gives device {device!r} twice; give each device once, "
                f"{_MEMORY_EXAMPLE}"
            )
        limits[key] = _memory_bytes(size.strip(), entry)
    return limits


def _memory_device(device: str, entry: str) -> int | str:
    name = device.lower()
    if name in ("cpu", "mps"):
        return name
    index = name.removeprefix("cuda:")
    if index.isdigit():
        return int(index)
    raise ConfigError(
        f"invalid device {device!r} in --max-memory entry {entry!r}: use cpu, mps, a GPU "
        f"index N or cuda:N, {_MEMORY_EXAMPLE}"
    )


def _memory_bytes(size: str, entry: str) -> int:
    match = _MEMORY_SIZE.fullmatch(size)
    unit = match.group(2).upper() if match else ""
    if match is None or (unit and unit not in MEMORY_UNITS):
        raise ConfigError(
            f"invalid size {size!r} in --max-memory entry {entry!r}: use a number of bytes "
            f"or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB, {_MEMORY_EXAMPLE}"
        )
    value = int(float(match.group(1)) * MEMORY_UNITS[unit or "B"])
    if value <= 0:
        raise ConfigError(f"--max-memory entry {entry!r} gives no memory; use a size above 0")
    return value


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
        return f"{name.replace('_', '-')} must be a list of strings, got {value!r}"
    if name == "batch_size" and not (
        (isinstance(value, int) and not isinstance(value, bool)) or value == "auto"
    ):
        return f"batch-size must be an integer or 'auto', got {value!r}"
    if expected is None and name != "batch_size" and not isinstance(value, str):
        return f"{name.replace('_', '-')} must be a string, got {value!r}"
    return None
