"""Run a configured evaluation end to end: load, score, write outputs, build results.

:func:`run_perplexity` is what ``lmeval ppl`` calls; it returns the results.json
object, and writes it when the configuration has an output directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from tqdm import tqdm

from lmeval.config import RunConfig, validate_config
from lmeval.data import load_corpus
from lmeval.diagnostics import compute_diagnostics
from lmeval.errors import ConfigError
from lmeval.models import load_model
from lmeval.perplexity import (
    DocumentResult,
    ScoringSettings,
    build_units,
    corpus_metrics,
    interval_method,
    resolve_settings,
    score_units,
)
from lmeval.results import OutputDirectory, environment, library_versions, now
from lmeval.scoring import default_chunk_size, prefix_token_id
from lmeval.tokens import TOKENS_FILE, write_tokens

logger = logging.getLogger(__name__)

WORD_DEFINITION = "whitespace-separated strings of the original document text (str.split)"
BYTE_DEFINITION = "UTF-8 bytes of the original document text"


def run_perplexity(config: RunConfig, progress_bar: bool = True, save_tokens: bool = False) -> dict:
    """Score ``config.model`` on the configured corpus and return the results object.

    The progress bar is shown when both ``progress_bar`` and ``config.progress`` are
    true. With ``save_tokens``, every scored token is also written to
    ``config.output/tokens.parquet`` (see :mod:`lmeval.tokens`), entropy included.

    Raises:
        ConfigError: besides invalid options, ``save_tokens`` without an output
            directory, or with a resumed run whose earlier documents have no
            per-token values.
    """
    validate_config(config)
    if save_tokens and not config.output:
        raise ConfigError("--save-tokens needs --output DIR, the directory tokens.parquet goes to")
    started = time.perf_counter()
    set_threads(config.threads)
    corpus = load_corpus(
        task=config.task,
        data=config.data,
        data_files=config.data_files,
        text_field=config.text_field,
        dataset_config=config.dataset_config,
        split=config.split,
        sample_by=config.sample_by,
        # With llama-cpp, --limit counts chunks of the token stream, not documents.
        limit=None if config.protocol == "llama-cpp" else config.limit,
    )
    load_started = time.perf_counter()
    loaded = load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        cache_dir=config.cache_dir,
    )
    load_seconds = time.perf_counter() - load_started
    settings = resolve_settings(_settings(config), loaded)
    settings = dataclasses.replace(settings, with_entropy=save_tokens)
    protocol = protocol_record(settings, loaded)
    run = run_identity(config, loaded.identity, corpus.identity, protocol)

    output = OutputDirectory(config.output, run, config.resume) if config.output else None
    finished = output.finished_indices if output else set()
    units = [
        u for u in build_units(loaded, corpus.documents, settings) if u.result.index not in finished
    ]
    if finished:
        logger.info("resuming: %d documents already scored, %d to go", len(finished), len(units))
    if finished and save_tokens:
        raise ConfigError(
            f"--save-tokens cannot resume {config.output!r}: its {len(finished)} finished "
            "documents have no per-token values; choose a new --output to rescore them all"
        )

    scoring_started = time.perf_counter()
    total = sum(unit.num_scored for unit in units)
    with tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        # RunConfig.progress turns the bar off for library callers too.
        disable=not (progress_bar and config.progress),
        desc="scoring",
    ) as bar:
        documents = score_units(
            loaded,
            units,
            settings,
            on_document=(lambda d: output.append(d.row())) if output else None,
            progress=bar.update,
        )
    scoring_seconds = time.perf_counter() - scoring_started
    diagnostics = compute_diagnostics(documents, loaded.tokenizer, settings.window_size)
    if save_tokens:
        write_tokens(os.path.join(config.output, TOKENS_FILE), documents, loaded.tokenizer)

    if output:
        documents = [DocumentResult.from_row(row) for row in output.finished_rows] + documents
        documents.sort(key=lambda document: document.index)
    results = {
        "lmeval_version": library_versions()["lmeval"],
        "command": "ppl",
        "created": now(),
        "metrics": corpus_metrics(documents, settings.protocol),
        "diagnostics": diagnostics,
        "interval_method": interval_method(
            settings.protocol, sum(d.skipped is None for d in documents)
        ),
        "definitions": {"word": WORD_DEFINITION, "byte": BYTE_DEFINITION},
        "protocol": protocol,
        "model": loaded.identity,
        "data": corpus.identity,
        "skipped": [
            {"index": d.index, "id": d.id, "reason": d.skipped}
            for d in documents
            if d.skipped is not None
        ],
        "config": _config_record(config),
        "versions": library_versions(),
        "environment": environment(),
        "timing": {
            "load_seconds": load_seconds,
            "scoring_seconds": scoring_seconds,
            "wall_seconds": time.perf_counter() - started,
            "tokens_scored": total,
            "tokens_per_second": total / scoring_seconds if scoring_seconds > 0 else 0.0,
            "resumed_documents": len(finished),
        },
    }
    if output:
        output.write_results(results)
    return results


def run_identity(config: RunConfig, model: dict, data: dict, protocol: dict) -> dict:
    """Return what identifies a run for resuming: the input of its config fingerprint.

    Values that may differ between two runs of the same command are left out or
    replaced by what was requested: the GGUF cache directory (it follows
    --cache-dir and $LMEVAL_CACHE_DIR, and contains the same weights wherever it is),
    the file path of a built-in model (gemma3-270m is assembled in that cache
    directory; its name and sha256 identify it) and the batch size that
    ``--batch-size auto`` chose from the free memory.
    """
    varying = {"cache_path", "path"} if model.get("source") == "builtin" else {"cache_path"}
    model = {key: value for key, value in model.items() if key not in varying}
    protocol = protocol | {"batch_size": config.batch_size}
    return {"command": "ppl", "model": model, "data": data, "protocol": protocol}


def protocol_record(settings: ScoringSettings, loaded) -> dict:
    """Describe exactly which tokens were scored and how, for results.json."""
    tokenizer = loaded.tokenizer
    record = {
        "name": settings.protocol,
        "window_size": settings.window_size,
        "stride": settings.stride,
        "batch_size": settings.batch_size,
        "padding_side": settings.padding_side,
        "logits_chunk_size": settings.chunk_size
        or default_chunk_size(loaded.model.get_output_embeddings().weight.shape[0]),
        "log_softmax_dtype": "float32",
        "accumulation_dtype": "float64",
    }
    if settings.protocol == "llama-cpp":
        add_bos = bool(loaded.identity.get("add_bos_token"))
        record["bos_replaces_first_token"] = add_bos
        record["scored_per_chunk"] = settings.window_size - 1 - settings.window_size // 2
        record["max_chunks"] = settings.max_chunks
    else:
        prefix = prefix_token_id(tokenizer)
        record["prefix_token_id"] = prefix
        record["prefix_token"] = tokenizer.convert_ids_to_tokens(prefix)
    return record


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads, or every core this process may run on."""
    count = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)


def _settings(config: RunConfig) -> ScoringSettings:
    return ScoringSettings(
        protocol=config.protocol,
        window_size=config.window_size,
        stride=config.stride,
        batch_size=config.batch_size,
        chunk_size=config.logits_chunk_size,
        padding_side=config.padding_side,
        max_chunks=config.limit if config.protocol == "llama-cpp" else None,
    )


def _config_record(config: RunConfig) -> dict:
    record = dataclasses.asdict(config)
    record.pop("extra", None)
    return record
