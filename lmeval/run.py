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

from lmeval.config import RunConfig, parse_max_memory, validate_config
from lmeval.data import load_corpus
from lmeval.diagnostics import compute_diagnostics, document_summary
from lmeval.distributed import (
    ProcessGroup,
    SingleProcess,
    joined,
    shard_groups,
    shared_progress,
    threads_per_rank,
)
from lmeval.errors import ConfigError
from lmeval.models import load_model
from lmeval.perplexity import (
    WINDOWS_PER_GROUP,
    DocumentResult,
    ScoringSettings,
    build_units,
    corpus_metrics,
    group_units,
    interval_method,
    resolve_settings,
    score_groups,
)
from lmeval.results import (
    RESULTS_FILE,
    OutputDirectory,
    RankRows,
    check_output_directory,
    environment,
    finished_results,
    library_versions,
    now,
)
from lmeval.scoring import default_chunk_size, prefix_token_id
from lmeval.tokens import TOKENS_FILE, write_tokens

logger = logging.getLogger(__name__)

WORD_DEFINITION = "whitespace-separated strings of the original document text (str.split)"
BYTE_DEFINITION = "UTF-8 bytes of the original document text"


def run_perplexity(
    config: RunConfig,
    progress_bar: bool = True,
    save_tokens: bool = False,
    *,
    group: SingleProcess | ProcessGroup | None = None,
    skip_finished: bool = False,
) -> dict:
    """Score ``config.model`` on the configured corpus and return the results object.

    The progress bar is shown when both ``progress_bar`` and ``config.progress`` are
    true. With ``save_tokens``, every scored token is also written to
    ``config.output/tokens.parquet`` (see :mod:`lmeval.tokens`), entropy included.

    Under torchrun or accelerate launch, each rank scores a share of the documents
    and rank 0 alone writes the outputs; every rank returns the same results.

    Args:
        group: the ranks to share the work with; None joins those of the launch (see
            :func:`lmeval.distributed.start`) for this call.
        skip_finished: when ``config.output`` contains the finished results of the same
            configuration, return them without scoring, with the key ``reused_from``
            added: the path of that results.json.

    Raises:
        ConfigError: besides invalid options, ``save_tokens`` without an output
            directory, or with a resumed run whose earlier documents have no
            per-token values.
    """
    validate_config(config)
    if not isinstance(config.model, str):
        raise ConfigError(
            f"run_perplexity scores one model, got {len(config.model)}; score several "
            "with lmeval.checkpoints.run_checkpoints"
        )
    if save_tokens and not config.output:
        raise ConfigError("--save-tokens needs --output DIR, the directory tokens.parquet goes to")
    if config.output:
        check_output_directory(config.output)
    with joined(group, config.device, config.device_map) as group:
        return _run_perplexity(config, progress_bar, save_tokens, group, skip_finished)


def _run_perplexity(
    config: RunConfig,
    progress_bar: bool,
    save_tokens: bool,
    group: SingleProcess | ProcessGroup,
    skip_finished: bool,
) -> dict:
    started = time.perf_counter()
    set_threads(threads_per_rank(config.threads, group.local_world_size))
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
        device=group.device,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        cache_dir=config.cache_dir,
        device_map=config.device_map,
        max_memory=parse_max_memory(config.max_memory) if config.max_memory else None,
        compile=config.compile,
    )
    load_seconds = time.perf_counter() - load_started
    settings = resolve_settings(_settings(config), loaded)
    settings = dataclasses.replace(settings, with_entropy=save_tokens)
    protocol = protocol_record(settings, loaded)
    run = run_identity(config, loaded.identity, corpus.identity, protocol)

    outputs = _Outputs(config, run, group)
    # NOTE: a finished run is recognised only after its model is loaded, because the
    # fingerprint includes the model's identity (weights' sha256, parameter count).
    stored = group.run_on_main(lambda: outputs.prepare(skip_finished))
    if stored["results"] is not None:
        logger.info(
            "skipping %s: %s contains finished results of the same configuration",
            config.model,
            config.output,
        )
        return stored["results"] | {"reused_from": os.path.join(config.output, RESULTS_FILE)}
    finished = stored["finished"]
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
    groups = list(group_units(units, WINDOWS_PER_GROUP * settings.batch_size))
    shards = shard_groups([sum(u.num_scored for u in g) for g in groups], group.world_size)
    if group.world_size > 1:
        logger.info(
            "rank %d of %d scores %d of %d groups",
            group.rank,
            group.world_size,
            len(shards[group.rank]),
            len(groups),
        )

    scoring_started = time.perf_counter()
    total = sum(unit.num_scored for unit in units)
    rows = outputs.rows_file()
    # RunConfig.progress turns the bar off for library callers too.
    show_progress = progress_bar and config.progress
    with shared_progress(group, total, show_progress, "scoring") as progress:
        documents = score_groups(
            loaded,
            [groups[index] for index in shards[group.rank]],
            settings,
            on_document=(lambda d: rows.append(d.row())) if rows else None,
            progress=progress,
        )
        if rows is not None and not group.is_main:
            rows.close()
        # NOTE: the per-token arrays (about 30 bytes a token) travel to rank 0 too, for
        # the diagnostics and --save-tokens, so rank 0's memory grows with the corpus.
        gathered = group.gather(documents)
    scoring_seconds = time.perf_counter() - scoring_started

    def finish() -> dict:
        every = sorted((document for part in gathered for document in part), key=lambda d: d.index)
        timing = {
            "started": started,
            "load_seconds": load_seconds,
            "scoring_seconds": scoring_seconds,
            "tokens_scored": total,
            "resumed_documents": len(finished),
        }
        return _finish(config, loaded, corpus, settings, protocol, outputs, every, timing, group)

    return group.run_on_main(finish)


class _Outputs:
    """The output directory of a run, on rank 0, and the rows file of each rank."""

    def __init__(self, config: RunConfig, run: dict, group: SingleProcess | ProcessGroup):
        self.config = config
        self.run = run
        self.group = group
        self.directory: OutputDirectory | None = None

    def prepare(self, skip_finished: bool) -> dict:
        """Open the output directory (rank 0 only); return finished rows or results."""
        if not self.config.output:
            return {"finished": set(), "results": None}
        if skip_finished:
            results = finished_results(self.config.output, self.run)
            if results is not None:
                return {"finished": set(), "results": results}
        self.directory = OutputDirectory(self.config.output, self.run, self.config.resume)
        return {"finished": self.directory.finished_indices, "results": None}

    def rows_file(self) -> OutputDirectory | RankRows | None:
        """Return where this rank appends its finished rows."""
        if not self.config.output:
            return None
        if self.group.is_main:
            return self.directory
        return RankRows(self.config.output, self.group.rank)


def _finish(
    config: RunConfig,
    loaded,
    corpus,
    settings: ScoringSettings,
    protocol: dict,
    outputs: _Outputs,
    documents: list[DocumentResult],
    timing: dict,
    group: SingleProcess | ProcessGroup,
) -> dict:
    """Build (on rank 0) the results object from every rank's documents and write it."""
    diagnostics = compute_diagnostics(documents, loaded.tokenizer, settings.window_size)
    if settings.with_entropy:
        write_tokens(os.path.join(config.output, TOKENS_FILE), documents, loaded.tokenizer)

    output = outputs.directory
    if output:
        resumed = [DocumentResult.from_row(row) for row in output.finished_rows]
        if group.world_size > 1:
            output.merge_rows(output.finished_rows + [d.row() for d in documents])
        documents = sorted(resumed + documents, key=lambda document: document.index)
        scored = [d for d in documents if d.skipped is None]
        if resumed and scored:
            # Per-document sums survive in documents.jsonl, so the document percentiles
            # and worst documents of a resumed run cover every document.
            diagnostics["documents"] = document_summary(scored)
    total = timing["tokens_scored"]
    scoring_seconds = timing["scoring_seconds"]
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
        "environment": environment() | {"world_size": group.world_size},
        "timing": {
            "load_seconds": timing["load_seconds"],
            "scoring_seconds": scoring_seconds,
            "wall_seconds": time.perf_counter() - timing["started"],
            "tokens_scored": total,
            "tokens_per_second": total / scoring_seconds if scoring_seconds > 0 else 0.0,
            "resumed_documents": timing["resumed_documents"],
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
