"""Reference caches: a reference model's next-token distributions, computed once.

A run with ``--save-reference FILE`` writes what a later comparison needs of the
reference at every scored position, so that ``--reference-cache FILE`` can compare
any number of candidates without loading the reference again.

The file is a safetensors file. Its tensors have one row per scored position (N in
all), in the order of the run's windows and, within a window, of its targets:

- format ``exact``: ``logprobs`` ``[N, V]`` in float32, or float16 to halve the size;
- format ``compact``: ``topk_ids`` ``[N, K]`` int32, ``topk_logprobs`` ``[N, K]``
  float32 and ``rest_logprob`` ``[N]`` float32, the log of the probability of all
  tokens outside the top K;
- both: ``top_ids`` ``[N, 5]`` int32 and ``top_logprobs`` ``[N, 5]`` float32 (for top-1
  and top-5 agreement), ``target_logprob`` ``[N]`` float32 (for perplexity and Δp),
  ``entropy`` ``[N]`` float64 and ``dropped_mass`` ``[N]`` float32 (the probability
  on output rows beyond the tokenizer's ids).

The header's ``__metadata__`` holds one key, ``lmeval_reference_cache``, whose value is a
JSON object: format version, format, dtype, top K, the reference's identity, the data's
identity, the protocol, the tokenizer's id -> token list, the sha256 of the windows
(see :func:`windows_sha256`) and the number of windows and positions. A run that reads
the cache checks all of them and rejects a mismatch.

KL(P ‖ P) stays exactly 0 for a candidate identical to the reference: float32 values
are stored as computed, and with float16 the candidate's distribution is rounded the
same way as the stored one (see :func:`lmeval.kl.round_logprobs`). Either needs the
same batch size, padding side and chunk size as the run that wrote the cache, so a
reading run takes those from the cache unless its own options set them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmeval.errors import ConfigError
from lmeval.kl import TOP_TOKENS, ReferenceChunk, TopKSummary
from lmeval.windows import Window

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "lmeval_reference_cache"
CACHE_FORMATS = ("exact", "compact")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_TOP_K = 64

EXACT_BOUND = "exact: the reference's whole distribution is stored"
FLOAT16_BOUND = (
    "exact for the float16-rounded distributions: the stored log-probabilities and the "
    "model's are both rounded to float16 (a relative error of at most 2^-11 each) and "
    "renormalized, which can change small KL values by a comparable amount; store "
    "float32 to measure small drifts"
)
COMPACT_BOUND = (
    "lower bound, in both directions (and for JS and TV): each distribution is coarsened "
    "to the reference's top {k} tokens plus one bucket for all other tokens, and "
    "coarsening never increases an f-divergence (data-processing inequality). The gap "
    "of KL(reference || model) is p_rest * KL(reference || model restricted to the rest), "
    "with p_rest the reference mass outside its top {k}, reported as reference_rest_mass"
)

_SAFETENSORS_DTYPES = {
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int32): "I32",
}
_NUMPY_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class CacheOptions:
    """Storage options of a reference cache.

    Attributes:
        format: "exact" (the whole distribution) or "compact" (top K plus the rest).
        dtype: "float32" or "float16", the dtype of exact log-probabilities.
        top_k: K, for the compact format; at least 5.
    """

    format: str = "exact"
    dtype: str = "float32"
    top_k: int = DEFAULT_TOP_K

    def check(self) -> None:
        """Raise ConfigError on an unknown format or dtype, or a top K below 5."""
        if self.format not in CACHE_FORMATS:
            raise ConfigError(
                f"invalid cache format {self.format!r}; use one of {', '.join(CACHE_FORMATS)}"
            )
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"invalid cache dtype {self.dtype!r}; use one of {', '.join(CACHE_DTYPES)}"
            )
        if self.format == "compact" and self.dtype != "float32":
            raise ConfigError(
                "--cache-dtype applies to the exact format; a compact cache stores float32"
            )
        if self.top_k < TOP_TOKENS:
            raise ConfigError(
                f"--cache-top-k must be at least {TOP_TOKENS} (top-5 agreement needs the "
                f"reference's top 5), got {self.top_k}"
            )


def tensor_layout(
    options: CacheOptions, num_positions: int, vocabulary_size: int
) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """Return the (name, dtype, shape) of every tensor of a cache, in file order."""
    n = num_positions
    top = min(TOP_TOKENS, vocabulary_size)
    if options.format == "exact":
        dtype = np.dtype(np.float16 if options.dtype == "float16" else np.float32)
        layout = [("logprobs", dtype, (n, vocabulary_size))]
    else:
        k = min(options.top_k, vocabulary_size)
        layout = [
            ("topk_ids", np.dtype(np.int32), (n, k)),
            ("topk_logprobs", np.dtype(np.float32), (n, k)),
            ("rest_logprob", np.dtype(np.float32), (n,)),
        ]
    return layout + [
        ("top_ids", np.dtype(np.int32), (n, top)),
        ("top_logprobs", np.dtype(np.float32), (n, top)),
        ("target_logprob", np.dtype(np.float32), (n,)),
        ("entropy", np.dtype(np.float64), (n,)),
        ("dropped_mass", np.dtype(np.float32), (n,)),
    ]


def cache_size_bytes(options: CacheOptions, num_positions: int, vocabulary_size: int) -> int:
    """Return the bytes of tensor data a cache of ``num_positions`` positions holds."""
    layout = tensor_layout(options, num_positions, vocabulary_size)
    return sum(dtype.itemsize * int(np.prod(shape)) for _name, dtype, shape in layout)


def windows_sha256(windows: Sequence[Window]) -> str:
    """Hash the windows' token ids, scored ranges and document indices, in order."""
    digest = hashlib.sha256()
    for window in windows:
        header = (len(window.input_ids), window.score_start, window.first_target, window.document)
        digest.update(np.asarray(header, dtype=np.int64).tobytes())
        digest.update(np.asarray(window.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(window.target_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def row_offsets(windows: Sequence[Window]) -> np.ndarray:
    """Return the first cache row of every window, and the row count last, ``[W + 1]``."""
    return np.concatenate([[0], np.cumsum([window.num_scored for window in windows])]).astype(
        np.int64
    )


def batch_rows(offsets: np.ndarray, window_indices: Sequence[int]) -> np.ndarray:
    """Return the cache rows of a batch's scored positions, window by window."""
    return np.concatenate(
        [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in window_indices]
    )


def format_bytes(size: int) -> str:
    """Format a size in bytes with a binary unit, e.g. "1.5 GiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Writing ----------------------------------------------------------------------------


class CacheWriter:
    """Write a reference cache chunk by chunk, through memory maps of its tensors.

    The file is written under a temporary name in the same directory and renamed by
    :meth:`finish`, so an interrupted run never leaves a partial cache under ``path``.

    Args:
        path: the cache file to write.
        options: format, dtype and top K.
        windows: the run's windows, in order.
        vocabulary_size: V, the tokenizer ids stored.
        metadata: identity of the reference, data and protocol, and the tokens.
        partial: the temporary file of rank 0 of a sharded run, which this rank
            writes its rows into; None creates a new file.

    Raises:
        ConfigError: when the directory lacks the space for the cache.
    """

    def __init__(
        self,
        path: str | Path,
        options: CacheOptions,
        windows: Sequence[Window],
        vocabulary_size: int,
        metadata: dict[str, Any],
        partial: str | Path | None = None,
    ) -> None:
        options.check()
        self.path = Path(path)
        self.options = options
        self.offsets = row_offsets(windows)
        num_positions = int(self.offsets[-1])
        self.layout = tensor_layout(options, num_positions, vocabulary_size)
        self.metadata = {
            "format_version": FORMAT_VERSION,
            "format": options.format,
            "dtype": options.dtype if options.format == "exact" else "float32",
            "top_k": min(options.top_k, vocabulary_size) if options.format == "compact" else None,
            "vocabulary_size": vocabulary_size,
            "num_windows": len(windows),
            "num_positions": num_positions,
            "windows_sha256": windows_sha256(windows),
            **metadata,
        }
        self.size = cache_size_bytes(options, num_positions, vocabulary_size)
        self._attached = partial is not None
        if partial is not None:
            self._partial = Path(partial)
            header, data_start = _read_header(self._partial)
            self._maps = _memory_maps(self._partial, header, data_start, mode="r+")
            return
        self._check_space()
        self._partial = self.path.with_name(
            f".{self.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        )
        logger.info(
            "writing a %s reference cache of %d positions x %d tokens (%s) to %s",
            options.format,
            num_positions,
            vocabulary_size,
            format_bytes(self.size),
            self.path,
        )
        try:
            self._maps = _create_file(self._partial, self.layout, self.metadata)
        except OSError as error:
            raise ConfigError(
                f"cannot write --save-reference {str(self.path)!r}: {error}; choose a "
                "writable directory"
            ) from error

    def _check_space(self) -> None:
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise ConfigError(
                f"--save-reference {str(self.path)!r}: directory {str(directory)!r} not found"
            )
        free = shutil.disk_usage(directory).free
        if free < self.size:
            raise ConfigError(
                f"--save-reference {str(self.path)!r} needs {format_bytes(self.size)} but "
                f"{str(directory)!r} has {format_bytes(free)} free; use --cache-format "
                "compact, --cache-dtype float16, a smaller --limit, or another directory"
            )

    def write(
        self, window_indices: Sequence[int], begin: int, end: int, chunk: ReferenceChunk
    ) -> None:
        """Store one chunk: batch positions ``begin .. end - 1`` of the windows given."""
        rows = batch_rows(self.offsets, window_indices)[begin:end]
        values = {
            "top_ids": chunk.top_ids,
            "top_logprobs": chunk.top_logprobs,
            "target_logprob": chunk.target_logprob,
            "entropy": chunk.entropy,
            "dropped_mass": torch.zeros(len(rows)),
        }
        if chunk.dropped_mass is not None:
            values["dropped_mass"] = chunk.dropped_mass
        if self.options.format == "exact":
            values["logprobs"] = chunk.logprobs
        else:
            summary = TopKSummary.from_logprobs(chunk.logprobs, self.options.top_k)
            values |= {
                "topk_ids": summary.ids,
                "topk_logprobs": summary.logprobs,
                "rest_logprob": summary.rest_logprob,
            }
        for name, value in values.items():
            target = self._maps[name]
            target[rows] = value.detach().cpu().numpy().astype(target.dtype, copy=False)

    @property
    def partial_path(self) -> Path:
        """The temporary file, renamed to ``path`` by :meth:`finish`."""
        return self._partial

    def flush(self) -> None:
        """Write this process's rows to disk and close the memory maps."""
        for array in self._maps.values():
            if isinstance(array, np.memmap):
                array.flush()
        self._maps = {}

    def finish(self) -> dict:
        """Flush the file, move it to ``path`` and return its description.

        In a sharded run, rank 0 calls this after every rank's :meth:`flush`.
        """
        self.flush()
        os.replace(self._partial, self.path)
        logger.info("wrote reference cache %s (%s)", self.path, format_bytes(self.size))
        return cache_record(self.path, self.metadata, self.path.stat().st_size)

    def abort(self) -> None:
        """Delete the partial file, unless it belongs to rank 0 of a sharded run."""
        self._maps = {}
        if not self._attached:
            self._partial.unlink(missing_ok=True)


def check_save_path(path: str | Path) -> None:
    """Check, before any model loads, that a reference cache can be created at ``path``.

    Raises:
        ConfigError: ``path`` is a directory, or its parent is missing or not a directory.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(
            f"--save-reference {str(path)!r} is a directory; pass a file path such as "
            f"{str(path / 'reference.safetensors')!r}"
        )
    if directory.exists() and not directory.is_dir():
        raise ConfigError(
            f"--save-reference {str(path)!r}: {str(directory)!r} is a file, not a directory"
        )
    if not directory.is_dir():
        raise ConfigError(f"--save-reference {str(path)!r}: directory {str(directory)!r} not found")


def _create_file(
    path: Path, layout: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict
) -> dict[str, np.memmap]:
    """Write a safetensors header for ``layout`` and return a memory map of each tensor."""
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(metadata)}}
    offset = 0
    for name, dtype, shape in layout:
        size = dtype.itemsize * int(np.prod(shape))
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Spaces pad the header so that the tensor data starts at a multiple of 8 bytes.
    encoded += b" " * (-(8 + len(encoded)) % 8)
    data_start = 8 + len(encoded)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        file.truncate(data_start + offset)
    return _memory_maps(path, header, data_start, mode="r+")


def _memory_maps(path: Path, header: dict, data_start: int, mode: str) -> dict[str, np.memmap]:
    maps = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if begin == end:
            maps[name] = np.zeros(entry["shape"], dtype=_NUMPY_DTYPES[entry["dtype"]])
            continue
        maps[name] = np.memmap(
            path,
            dtype=_NUMPY_DTYPES[entry["dtype"]],
            mode=mode,
            offset=data_start + begin,
            shape=tuple(entry["shape"]),
        )
    return maps


def cache_record(path: Path, metadata: dict, size: int) -> dict:
    """Describe a cache for results.json: file, format, size and what its KL values are."""
    if metadata["format"] == "compact":
        estimate, bound = "lower bound", COMPACT_BOUND.format(k=metadata["top_k"])
    elif metadata["dtype"] == "float16":
        estimate, bound = "exact", FLOAT16_BOUND
    else:
        estimate, bound = "exact", EXACT_BOUND
    return {
        "path": str(path),
        "format": metadata["format"],
        "dtype": metadata["dtype"],
        "top_k": metadata["top_k"],
        "num_positions": metadata["num_positions"],
        "vocabulary_size": metadata["vocabulary_size"],
        "bytes": size,
        "size": format_bytes(size),
        "windows_sha256": metadata["windows_sha256"],
        "estimate": estimate,
        "bound": bound,
    }


# Reading ----------------------------------------------------------------------------


class ReferenceCache:
    """A reference cache opened for reading; see the module docstring for its contents.

    Use :meth:`open`, then :meth:`check_matches` before :meth:`reader`.
    """

    def __init__(self, path: Path, metadata: dict, maps: dict[str, np.memmap]) -> None:
        self.path = path
        self.metadata = metadata
        self.maps = maps

    @classmethod
    def open(cls, path: str | Path) -> ReferenceCache:
        """Open the cache at ``path``.

        Raises:
            ConfigError: when the file is missing or is not an lmeval reference cache.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"reference cache {str(path)!r} not found; write one with --save-reference"
            )
        header, data_start = _read_header(path)
        try:
            metadata = json.loads(header["__metadata__"][METADATA_KEY])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise ConfigError(
                f"{str(path)!r} is a safetensors file but not an lmeval reference cache; "
                "write one with --save-reference"
            ) from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"reference cache {str(path)!r} has format version "
                f"{metadata.get('format_version')!r}, but this lmeval reads version "
                f"{FORMAT_VERSION}; write it again with --save-reference"
            )
        return cls(path, metadata, _memory_maps(path, header, data_start, mode="r"))

    @property
    def estimate(self) -> str:
        return "lower bound" if self.metadata["format"] == "compact" else "exact"

    @property
    def tokens(self) -> list[str | None]:
        return self.metadata["vocabulary"]["tokens"]

    @property
    def protocol(self) -> dict:
        return self.metadata["protocol"]

    def record(self) -> dict:
        return cache_record(self.path, self.metadata, self.path.stat().st_size)

    def check_reference(self, spec: str | None, dtype: str | None) -> None:
        """Raise ConfigError when a reference named with the cache is not the cached one."""
        stored = self.metadata["reference"]
        if spec is not None and spec != stored["spec"]:
            raise ConfigError(
                f"reference cache {str(self.path)!r} was written for reference "
                f"{stored['spec']!r}, not {spec!r}; drop --reference or pass the cache of "
                "that model"
            )
        if dtype is not None and dtype != stored["dtype"]:
            raise ConfigError(
                f"reference cache {str(self.path)!r} was written with reference dtype "
                f"{stored['dtype']}, not {dtype}; drop --reference-dtype or write a new cache"
            )

    def check_matches(self, data: dict, protocol: dict, windows: Sequence[Window]) -> None:
        """Raise ConfigError unless this run scores the data and windows of the cache.

        Data, then protocol, then the windows' hash are compared, so that the error
        names the first option that differs.
        """
        stored = self.metadata
        for key in ("task", "documents_sha256", "normalization", "sample_by", "num_documents"):
            if data.get(key) != stored["data"].get(key):
                raise ConfigError(
                    f"reference cache {str(self.path)!r} was written on other data: its "
                    f"{key} is {stored['data'].get(key)!r}, this run's is {data.get(key)!r}; "
                    "pass the --task, --data, --data-files and --limit it was written with"
                )
        for key in ("name", "window_size", "stride", "max_chunks", "prefix_token_id"):
            if protocol.get(key) != stored["protocol"].get(key):
                option = {"name": "protocol", "max_chunks": "limit"}.get(key, key)
                raise ConfigError(
                    f"reference cache {str(self.path)!r} was written with {option} "
                    f"{stored['protocol'].get(key)!r}, this run uses {protocol.get(key)!r}; "
                    f"pass --{option.replace('_', '-')} "
                    f"{stored['protocol'].get(key)} or write a new cache"
                )
        if windows_sha256(windows) != stored["windows_sha256"]:
            raise ConfigError(
                f"this run's token windows differ from those of reference cache "
                f"{str(self.path)!r} although data and protocol match, so the model's "
                "tokenizer splits the text differently from the reference's; compare with "
                "--reference instead of the cache"
            )

    def reader(self, windows: Sequence[Window], chunk_size: int) -> CachedReference:
        """Return the reference side of a comparison over ``windows`` (checked first)."""
        return CachedReference(self, windows, chunk_size)


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ConfigError(f"reference cache {str(path)!r} is truncated; write it again")
        (length,) = struct.unpack("<Q", prefix)
        if length > path.stat().st_size:
            raise ConfigError(
                f"{str(path)!r} is not a safetensors file (header length {length} exceeds "
                "the file size); pass a file written with --save-reference"
            )
        encoded = file.read(length)
    try:
        return json.loads(encoded), 8 + length
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(
            f"{str(path)!r} is not a safetensors file; pass a file written with --save-reference"
        ) from None


class CachedReference:
    """The reference side of a comparison, read from a :class:`ReferenceCache`.

    Chunks follow the model scorer's: positions of a batch window by window, cut into
    runs of ``chunk_size``.
    """

    def __init__(self, cache: ReferenceCache, windows: Sequence[Window], chunk_size: int) -> None:
        self.cache = cache
        self.offsets = row_offsets(windows)
        self.chunk_size = chunk_size
        self.stored_as = CACHE_DTYPES[cache.metadata["dtype"]]

    def chunks(
        self, window_indices: Sequence[int], batch: Sequence[Window]
    ) -> Iterator[ReferenceChunk]:
        rows = batch_rows(self.offsets, window_indices)
        for begin in range(0, len(rows), self.chunk_size):
            yield self._chunk(rows[begin : begin + self.chunk_size])

    def dropped_mass(self) -> np.ndarray:
        return np.asarray(self.cache.maps["dropped_mass"])

    def _chunk(self, rows: np.ndarray) -> ReferenceChunk:
        maps = self.cache.maps

        def read(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(maps[name][rows]))

        chunk = ReferenceChunk(
            top_ids=read("top_ids").long(),
            top_logprobs=read("top_logprobs"),
            target_logprob=read("target_logprob"),
            entropy=read("entropy"),
            stored_as=self.stored_as,
        )
        if "logprobs" in maps:
            logprobs = read("logprobs").float()
            if self.stored_as != torch.float32:
                # Renormalize as kl.round_logprobs does for the model's side.
                logprobs = torch.log_softmax(logprobs, dim=-1)
            chunk.logprobs = logprobs
        else:
            chunk.summary = TopKSummary(
                read("topk_ids").long(), read("topk_logprobs"), read("rest_logprob")
            )
        return chunk
