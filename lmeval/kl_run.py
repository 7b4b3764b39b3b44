"""Compare a model with a reference on a corpus end to end: load, score, write outputs.

:func:`run_kl` is what ``lmeval kl`` calls. It returns the results.json object and
writes it, with documents.jsonl, when the configuration has an output directory. A
configuration without a model only runs the reference and writes a reference cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmeval.config import DTYPES, PADDING_SIDES, parse_max_memory, placement_problems
from lmeval.data import Corpus, load_corpus
from lmeval.distributed import (
    ProcessGroup,
    SingleProcess,
    joined,
    shard_groups,
    shared_progress,
    threads_per_rank,
)
from lmeval.errors import ConfigError, ScoringError
from lmeval.kl import DIRECTIONS, summarize
from lmeval.kl_scoring import (
    ComparisonOptions,
    DocumentComparison,
    DroppedMass,
    LiveReference,
    SharedVocabulary,
    WorstTokens,
    check_vocabularies,
    compare_groups,
    default_kl_chunk_size,
    indexed_groups,
    json_safe,
    run_reference,
    token_list,
)
from lmeval.models import LoadedModel, load_model
from lmeval.perplexity import (
    WINDOWS_PER_GROUP,
    ScoringSettings,
    Unit,
    build_units,
    resolve_settings,
)
from lmeval.reference_cache import CacheOptions, CacheWriter, ReferenceCache, check_save_path
from lmeval.results import (
    CONFIG_FILE,
    RESULTS_FILE,
    OutputDirectory,
    RankRows,
    check_output_directory,
    environment,
    fingerprint,
    finished_results,
    library_versions,
    now,
    remove_unfinished,
    stored_fingerprint,
)
from lmeval.run import protocol_record, set_threads
from lmeval.scoring import WindowScorer
from lmeval.windows import PROTOCOLS, Window

logger = logging.getLogger(__name__)

DEFINITIONS = {
    "kl_model_ref": f"{DIRECTIONS['kl_model_ref']}, in nats, at each scored token",
    "kl_ref_model": f"{DIRECTIONS['kl_ref_model']}, in nats, at each scored token "
    "(llama-perplexity --kl-divergence reports this direction)",
    "js": "Jensen-Shannon divergence 0.5 KL(model || M) + 0.5 KL(reference || M), "
    "M = (model + reference) / 2, in nats; per-token mean",
    "tv": "total variation distance 0.5 sum_v |p_model(v) - p_ref(v)|; per-token mean",
    "top1_agreement": "fraction of scored tokens at which both models' most probable "
    "tokens are the same",
    "top5_overlap": "per-token mean of |top5_model & top5_ref| / 5",
    "delta_p": "p_model(x) - p_ref(x) for the true next token x",
    "log_ppl_ratio": "ln(perplexity_model / perplexity_ref), the per-token mean of "
    "nll_model - nll_ref",
    "k1": "per-token mean of -log r, r = p_ref(x) / p_model(x) at the true next token x "
    "(equals -log_ppl_ratio)",
    "k2": "per-token mean of (log r)^2 / 2",
    "k3": "per-token mean of (r - 1) - log r; k1 to k3 estimate KL(model || reference) "
    "without bias only for x sampled from the model, and here x is the text's token",
    "clamping": "per-token divergences that float rounding left below 0 are set to 0; "
    "num_clamped counts them and min_before_clamp is the lowest value before clamping",
    "non_finite": 'infinite values are written as the strings "inf" and "-inf"',
}


@dataclass
class KLConfig:
    """Every option of ``lmeval kl``; see ``lmeval kl --help`` for their meaning.

    Scoring options left None (protocol, window_size, stride, batch_size,
    logits_chunk_size, padding_side) take their values from the reference cache
    when one is read, else the defaults of ``lmeval ppl``. The cache options
    (cache_format, cache_dtype, cache_top_k) apply to ``save_reference``.
    """

    model: str | None = None
    reference: str | None = None
    task: str | None = None
    data: str | None = None
    data_files: list[str] | None = None
    text_field: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    sample_by: str | None = None
    limit: int | None = None
    protocol: str | None = None
    window_size: int | None = None
    stride: int | None = None
    batch_size: int | str | None = None
    logits_chunk_size: int | None = None
    padding_side: str | None = None
    dtype: str = "float32"
    reference_dtype: str | None = None
    device: str = "cpu"
    device_map: str | None = None
    max_memory: list[str] | None = None
    revision: str | None = None
    reference_revision: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    threads: int | None = None
    compile: bool = False
    save_reference: str | None = None
    reference_cache: str | None = None
    cache_format: str | None = None
    cache_dtype: str | None = None
    cache_top_k: int | None = None
    worst_tokens: int = 10
    output: str | None = None
    resume: bool = False
    json: bool = False
    progress: bool = True


#: Types of the KLConfig keys of a config file whose values are not strings.
KL_CONFIG_TYPES = {
    "data_files": list,
    "max_memory": list,
    "limit": int,
    "window_size": int,
    "stride": int,
    "logits_chunk_size": int,
    "threads": int,
    "cache_top_k": int,
    "worst_tokens": int,
    "trust_remote_code": bool,
    "compile": bool,
    "resume": bool,
    "json": bool,
    "progress": bool,
}


@dataclass
class _Sides:
    """The loaded models of a run and the vocabulary they are compared on."""

    model: LoadedModel | None
    reference: LoadedModel | None  # None when the reference is read from a cache
    reference_identity: dict
    reference_tokens: list[str | None]
    vocabulary: SharedVocabulary

    @property
    def tokenizing(self) -> LoadedModel:
        """The model whose tokenizer cuts the windows: the reference, when loaded."""
        return self.reference or self.model


def check_kl_config(config: KLConfig) -> None:
    """Check the options that need no model or data, and report every problem at once.

    Values from a config file skip the command line's choices and type checks, so
    choices and ranges are checked here for both.

    Raises:
        ConfigError: one line listing every missing, conflicting or invalid option.
    """
    problems = _source_problems(config) + _choice_problems(config) + _range_problems(config)
    problems += placement_problems(config.device, config.device_map, config.max_memory)
    if problems:
        raise ConfigError("; ".join(problems))


def _source_problems(config: KLConfig) -> list[str]:
    """Return the problems with where the model, the reference and the outputs come from."""
    problems = []
    if config.reference is None and config.reference_cache is None:
        problems.append(
            "no reference given; pass --reference MODEL, or --reference-cache FILE written "
            "by an earlier run with --save-reference"
        )
    if config.save_reference and config.reference_cache:
        problems.append(
            "--save-reference and --reference-cache were both given; a run either writes a "
            "reference cache or reads one"
        )
    if config.model is None and not config.save_reference:
        problems.append(
            "no model given; pass --model MODEL, or --save-reference FILE to only write "
            "the reference cache"
        )
    if config.model is None and config.output:
        problems.append("--output needs --model: a run that only writes a cache has no results")
    if config.resume:
        problems.append(
            "kl does not support --resume: its percentiles need every token's value; "
            "run again with a new --output"
        )

    cache_options = {"--cache-format": config.cache_format, "--cache-dtype": config.cache_dtype}
    cache_options["--cache-top-k"] = config.cache_top_k
    given = [name for name, value in cache_options.items() if value is not None]
    if given and not config.save_reference:
        problems.append(f"{', '.join(given)} apply to --save-reference, which was not given")
    if config.save_reference:
        try:
            cache_options_of(config).check()
        except ConfigError as error:
            problems.append(str(error))
    return problems


def _choice_problems(config: KLConfig) -> list[str]:
    choices = {
        "protocol": PROTOCOLS,
        "padding_side": PADDING_SIDES,
        "dtype": DTYPES,
        "reference_dtype": DTYPES,
    }
    problems = []
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value is not None and value not in allowed:
            option = name.replace("_", "-")
            problems.append(f"invalid --{option} {value!r}; use one of {', '.join(allowed)}")
    return problems


def _range_problems(config: KLConfig) -> list[str]:
    minimums = {
        "limit": 1,
        "window_size": 1,
        "stride": 1,
        "logits_chunk_size": 1,
        "threads": 1,
        "worst_tokens": 0,
    }
    if isinstance(config.batch_size, int):
        minimums["batch_size"] = 1
    problems = []
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if value is not None and value < minimum:
            option = name.replace("_", "-")
            problems.append(f"invalid --{option} {value}: must be at least {minimum}")
    return problems


def cache_options_of(config: KLConfig) -> CacheOptions:
    """Return the cache options of ``config``, with defaults for those not set."""
    defaults = CacheOptions()
    return CacheOptions(
        format=config.cache_format or defaults.format,
        dtype=config.cache_dtype or defaults.dtype,
        top_k=config.cache_top_k if config.cache_top_k is not None else defaults.top_k,
    )


def run_kl(
    config: KLConfig,
    progress_bar: bool = True,
    *,
    group: SingleProcess | ProcessGroup | None = None,
    skip_finished: bool = False,
) -> dict:
    """Compare ``config.model`` with its reference on the configured corpus.

    Under torchrun or accelerate launch, each rank compares a share of the documents
    (or writes its share of the reference cache) and rank 0 alone writes the results.

    Args:
        config: the options.
        progress_bar: show the progress bar when ``config.progress`` is true too.
        group: the ranks to share the work with; None joins those of the launch for
            this call (see :func:`lmeval.distributed.start`).
        skip_finished: when ``config.output`` contains the finished results of the same
            configuration, return them (with ``reused_from`` added) without
            comparing; an unfinished run there is deleted and compared again.

    Returns:
        The results.json object; without ``config.model``, a description of the
        reference cache written to ``config.save_reference``.

    Raises:
        ConfigError: on invalid options, tokenizers that map ids differently, or a
            reference cache written for other data or windows.
        ModelError, DataError: when a model or the data cannot be loaded.
        ScoringError: when nothing was scored or a model returned NaN.
    """
    check_kl_config(config)
    if config.output:
        check_output_directory(config.output)
    if config.save_reference:
        check_save_path(config.save_reference)
    with joined(group, config.device, config.device_map) as group:
        return _run_kl(config, progress_bar, group, skip_finished)


def _run_kl(
    config: KLConfig,
    progress_bar: bool,
    group: SingleProcess | ProcessGroup,
    skip_finished: bool,
) -> dict:
    started = time.perf_counter()
    set_threads(threads_per_rank(config.threads, group.local_world_size))
    cache = ReferenceCache.open(config.reference_cache) if config.reference_cache else None
    if cache is not None:
        cache.check_reference(config.reference, config.reference_dtype)
    protocol_name = config.protocol or (cache.protocol["name"] if cache else "rolling")
    corpus = _load_corpus(config, protocol_name)

    load_started = time.perf_counter()
    sides = _load_sides(config, cache, group.device)
    load_seconds = time.perf_counter() - load_started

    settings = _resolve_settings(config, sides, cache, protocol_name)
    units = build_units(sides.tokenizing, corpus.documents, settings)
    windows = [window for unit in units for window in unit.windows]
    protocol = protocol_record(settings, sides.tokenizing)
    if cache is not None:
        cache.check_matches(corpus.identity, protocol, windows)
    timing = {"started": started, "load_seconds": load_seconds}
    shards = _Shards(units, settings, group)
    if sides.model is None:
        show_progress = config.progress and progress_bar
        return _write_reference_only(
            config, sides, settings, corpus, shards, protocol, timing, show_progress
        )
    show_progress = config.progress and progress_bar
    return _compare(
        config,
        sides,
        cache,
        settings,
        corpus,
        shards,
        protocol,
        timing,
        show_progress,
        skip_finished,
    )


class _Shards:
    """The units of a run in scoring groups, and the groups of this rank.

    Attributes:
        units: every unit of the run, in order.
        groups: every group, each with the index of its first window (see
            :func:`lmeval.kl_scoring.indexed_groups`).
        mine: this rank's groups (see :func:`lmeval.distributed.shard_groups`).
    """

    def __init__(self, units: list[Unit], settings: ScoringSettings, group) -> None:
        self.units = units
        self.group = group
        self.groups = indexed_groups(units, WINDOWS_PER_GROUP * settings.batch_size)
        costs = [sum(unit.num_scored for unit in units) for _first, units in self.groups]
        shards = shard_groups(costs, group.world_size)
        self.mine = [self.groups[index] for index in shards[group.rank]]

    @property
    def windows(self) -> list[Window]:
        return [window for unit in self.units for window in unit.windows]


def _load_corpus(config: KLConfig, protocol_name: str) -> Corpus:
    return load_corpus(
        task=config.task,
        data=config.data,
        data_files=config.data_files,
        text_field=config.text_field,
        dataset_config=config.dataset_config,
        split=config.split,
        sample_by=config.sample_by,
        # With llama-cpp, --limit counts chunks of the token stream, not documents.
        limit=None if protocol_name == "llama-cpp" else config.limit,
    )


def _load_sides(config: KLConfig, cache: ReferenceCache | None, device: str) -> _Sides:
    common = {
        "device": device,
        "trust_remote_code": config.trust_remote_code,
        "cache_dir": config.cache_dir,
        "device_map": config.device_map,
        "max_memory": parse_max_memory(config.max_memory) if config.max_memory else None,
        "compile": config.compile,
    }
    reference = None
    if cache is None:
        reference = load_model(
            config.reference,
            dtype=config.reference_dtype or "float32",
            revision=config.reference_revision,
            **common,
        )
    model = None
    if config.model is not None:
        model = load_model(config.model, dtype=config.dtype, revision=config.revision, **common)

    if cache is not None:
        identity, tokens = cache.metadata["reference"], cache.tokens
    else:
        identity, tokens = reference.identity, token_list(reference.tokenizer)
    model_tokens = tokens if model is None else token_list(model.tokenizer)
    vocabulary = check_vocabularies(
        model_tokens,
        tokens,
        None if model is None else model.identity["vocab_size"],
        identity["vocab_size"],
    )
    if vocabulary.record()["renormalized"]:
        logger.info("vocabulary: %s", vocabulary.record()["note"])
    return _Sides(model, reference, identity, tokens, vocabulary)


def _resolve_settings(
    config: KLConfig, sides: _Sides, cache: ReferenceCache | None, protocol_name: str
) -> ScoringSettings:
    """Resolve the scoring settings; with a cache, unset options take its values."""
    cached = cache.protocol if cache is not None else {}
    same_protocol = cached.get("name") == protocol_name

    def cached_value(key: str):
        return cached.get(key) if same_protocol else None

    settings = ScoringSettings(
        protocol=protocol_name,
        window_size=config.window_size or cached_value("window_size"),
        stride=config.stride if config.stride is not None else cached_value("stride"),
        batch_size=config.batch_size or cached.get("batch_size") or 1,
        chunk_size=config.logits_chunk_size
        or cached.get("logits_chunk_size")
        or default_kl_chunk_size(sides.vocabulary.size),
        padding_side=config.padding_side or cached.get("padding_side") or "right",
        max_chunks=config.limit if protocol_name == "llama-cpp" else None,
    )
    settings = resolve_settings(settings, sides.tokenizing)
    if sides.model is not None and sides.model is not sides.tokenizing:
        _check_window_fits(settings, sides.model)
    if cache is not None:
        _warn_if_batching_differs(settings, cached)
    return settings


def _check_window_fits(settings: ScoringSettings, model: LoadedModel) -> None:
    limit = model.max_positions
    if limit is not None and settings.window_size > limit:
        raise ConfigError(
            f"the window of {settings.window_size} tokens is above the model's position "
            f"limit of {limit}; pass --window-size {limit} or less"
        )


def _warn_if_batching_differs(settings: ScoringSettings, cached: dict) -> None:
    current = {
        "batch_size": settings.batch_size,
        "logits_chunk_size": settings.chunk_size,
        "padding_side": settings.padding_side,
    }
    differing = [key for key, value in current.items() if cached.get(key) != value]
    if differing:
        logger.warning(
            "%s differ from the reference cache's; the numbers can differ by float rounding "
            "from a run that matches it (a model identical to the reference may then "
            "show a KL slightly above 0)",
            ", ".join(differing),
        )


def _scorer(loaded: LoadedModel, settings: ScoringSettings, pad_token_id: int) -> WindowScorer:
    return WindowScorer(
        loaded.model,
        batch_size=settings.batch_size,
        chunk_size=settings.chunk_size,
        pad_token_id=pad_token_id,
        padding_side=settings.padding_side,
    )


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _cache_writer(
    config: KLConfig, sides: _Sides, corpus: Corpus, protocol: dict, shards: _Shards
) -> CacheWriter:
    """Create the reference cache on rank 0; every other rank writes into the same file."""
    created: list[CacheWriter] = []

    def create() -> str:
        created.append(_new_cache_writer(config, sides, corpus, protocol, shards.units))
        return str(created[0].partial_path)

    partial = shards.group.run_on_main(create)
    if created:
        return created[0]
    return _new_cache_writer(config, sides, corpus, protocol, shards.units, partial)


def _new_cache_writer(
    config: KLConfig,
    sides: _Sides,
    corpus: Corpus,
    protocol: dict,
    units: list[Unit],
    partial: str | None = None,
) -> CacheWriter:
    metadata = {
        "reference": sides.reference_identity,
        "data": corpus.identity,
        "protocol": protocol,
        "vocabulary": {"size": sides.vocabulary.size, "tokens": sides.reference_tokens},
        "created": now(),
        "versions": library_versions(),
    }
    windows = [window for unit in units for window in unit.windows]
    return CacheWriter(
        config.save_reference,
        cache_options_of(config),
        windows,
        sides.vocabulary.size,
        metadata,
        partial=partial,
    )


def _write_reference_only(
    config: KLConfig,
    sides: _Sides,
    settings: ScoringSettings,
    corpus: Corpus,
    shards: _Shards,
    protocol: dict,
    timing: dict,
    show_progress: bool,
) -> dict:
    windows = shards.windows
    group = shards.group
    pad = _pad_token_id(sides.reference.tokenizer)
    scorer = _scorer(sides.reference, settings, pad)
    writer = _cache_writer(config, sides, corpus, protocol, shards)
    reference = LiveReference(scorer, sides.vocabulary.size, recorder=writer)
    scoring_started = time.perf_counter()
    total = sum(window.num_scored for window in windows)
    try:
        with shared_progress(group, total, show_progress, "reference") as progress:
            if group.world_size == 1:
                run_reference(scorer, reference, windows, progress)
            else:
                # NOTE: ranks batch within scoring groups, as a comparison does, but one
                # process batches all windows together. With --batch-size above 1, the
                # stored values can then differ from one process's by float rounding.
                for first_index, units in shards.mine:
                    part = [window for unit in units for window in unit.windows]
                    run_reference(scorer, reference, part, progress, first_index)
            writer.flush()
            group.barrier()
        record = group.run_on_main(writer.finish)
    except BaseException:
        writer.abort()
        raise
    return {
        "lmeval_version": library_versions()["lmeval"],
        "command": "kl",
        "created": now(),
        "reference_cache": record,
        "reference": sides.reference_identity,
        "vocabulary": sides.vocabulary.record(),
        "protocol": protocol,
        "data": corpus.identity,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "environment": environment(),
        "timing": _timing(timing, scoring_started, total),
    }


def _compare(
    config: KLConfig,
    sides: _Sides,
    cache: ReferenceCache | None,
    settings: ScoringSettings,
    corpus: Corpus,
    shards: _Shards,
    protocol: dict,
    timing: dict,
    show_progress: bool,
    skip_finished: bool,
) -> dict:
    windows = shards.windows
    group = shards.group
    estimate = cache.estimate if cache is not None else "exact"
    run = {
        "command": "kl",
        "model": sides.model.identity,
        "reference": sides.reference_identity,
        "data": corpus.identity,
        "protocol": protocol,
        "reference_cache": None if cache is None else cache.record()["windows_sha256"],
    }
    outputs = _KLOutputs(config, run, group)
    stored = group.run_on_main(lambda: outputs.prepare(skip_finished))
    if stored is not None:
        logger.info(
            "skipping %s: %s contains finished results of the same configuration",
            config.model,
            config.output,
        )
        return stored | {"reused_from": str(Path(config.output) / RESULTS_FILE)}

    pad = _pad_token_id(sides.tokenizing.tokenizer)
    model_scorer = _scorer(sides.model, settings, pad)
    writer = (
        _cache_writer(config, sides, corpus, protocol, shards) if config.save_reference else None
    )
    if cache is not None:
        reference = cache.reader(windows, settings.chunk_size)
    else:
        reference_scorer = _scorer(sides.reference, settings, pad)
        reference = LiveReference(reference_scorer, sides.vocabulary.size, recorder=writer)
    rows = outputs.rows_file()
    options = ComparisonOptions(worst=WorstTokens(config.worst_tokens))

    scoring_started = time.perf_counter()
    total = sum(window.num_scored for window in windows)
    try:
        with shared_progress(group, total, show_progress, "comparing") as progress:
            options.progress = progress
            documents = compare_groups(
                model_scorer,
                reference,
                shards.mine,
                sides.vocabulary.size,
                options=options,
                on_document=(lambda d: rows.append(d.row(estimate))) if rows else None,
            )
            if rows is not None and not group.is_main:
                rows.close()
            if writer is not None:
                writer.flush()
            gathered = group.gather(_RankComparison.of(documents, options, reference))
        cache_record = group.run_on_main(writer.finish) if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        if outputs.directory is not None:
            outputs.directory.close()
        raise
    if cache is not None:
        cache_record = cache.record()

    def finish() -> dict:
        every = _merge_ranks(gathered, options, reference)
        if group.world_size > 1 and outputs.directory is not None:
            outputs.directory.merge_rows([d.row(estimate) for d in every])
        return _compare_results(
            config,
            sides,
            settings,
            corpus,
            shards.units,
            protocol,
            timing,
            every,
            options,
            reference,
            estimate,
            cache_record,
            outputs.directory,
            scoring_started,
            total,
            group.world_size,
        )

    return group.run_on_main(finish)


@dataclass
class _RankComparison:
    """One rank's part of a comparison, sent to rank 0: documents and tracker state."""

    documents: list[DocumentComparison]
    worst: list
    model_dropped: DroppedMass
    reference_dropped: DroppedMass | None

    @classmethod
    def of(cls, documents, options: ComparisonOptions, reference) -> _RankComparison:
        live = isinstance(reference, LiveReference)
        return cls(
            documents,
            options.worst.kept(),
            options.dropped,
            reference.dropped if live else None,
        )


def _merge_ranks(
    gathered: list[_RankComparison], options: ComparisonOptions, reference
) -> list[DocumentComparison]:
    """Merge the other ranks' trackers into rank 0's; return every document in order."""
    for part in gathered[1:]:
        options.worst.merge(part.worst)
        options.dropped.merge(part.model_dropped)
        if part.reference_dropped is not None:
            reference.dropped.merge(part.reference_dropped)
    documents = [document for part in gathered for document in part.documents]
    return sorted(documents, key=lambda document: document.result.index)


class _KLOutputs:
    """The output directory of a kl run, on rank 0, and the rows file of each rank."""

    def __init__(self, config: KLConfig, run: dict, group: SingleProcess | ProcessGroup):
        self.config = config
        self.run = run
        self.group = group
        self.directory: OutputDirectory | None = None

    def prepare(self, skip_finished: bool) -> dict | None:
        """Open the output directory (rank 0 only); return finished results to reuse."""
        if not self.config.output:
            return None
        path = Path(self.config.output)
        if skip_finished:
            stored = finished_results(path, self.run)
            if stored is not None:
                return stored
            if stored_fingerprint(path) == fingerprint(self.run):
                logger.info("comparing again: %s contains an unfinished run of this model", path)
                remove_unfinished(path)
        _check_output_is_new(path)
        self.directory = OutputDirectory(self.config.output, self.run, resume=False)
        return None

    def rows_file(self) -> OutputDirectory | RankRows | None:
        if not self.config.output:
            return None
        if self.group.is_main:
            return self.directory
        return RankRows(self.config.output, self.group.rank)


def _compare_results(
    config: KLConfig,
    sides: _Sides,
    settings: ScoringSettings,
    corpus: Corpus,
    units: list[Unit],
    protocol: dict,
    timing: dict,
    documents: list[DocumentComparison],
    options: ComparisonOptions,
    reference,
    estimate: str,
    cache_record: dict | None,
    output: OutputDirectory | None,
    scoring_started: float,
    total: int,
    world_size: int,
) -> dict:
    """Build (on rank 0) the results object of a comparison and write it."""
    results = {
        "lmeval_version": library_versions()["lmeval"],
        "command": "kl",
        "created": now(),
        "metrics": _corpus_metrics(documents, settings.protocol, estimate),
        "stderr_method": _stderr_method(documents, settings.protocol),
        "estimate": estimate,
        "definitions": DEFINITIONS,
        "vocabulary": _vocabulary_record(sides.vocabulary, options, reference),
        "reference_cache": cache_record,
        "worst_tokens": options.worst.records(
            sides.tokenizing.tokenizer, [unit.result for unit in units]
        ),
        "worst_tokens_by": options.worst.key,
        "protocol": protocol,
        "model": sides.model.identity,
        "reference": sides.reference_identity,
        "data": corpus.identity,
        "skipped": [
            {"index": d.result.index, "id": d.result.id, "reason": d.result.skipped}
            for d in documents
            if d.result.skipped is not None
        ],
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "environment": environment() | {"world_size": world_size},
        "timing": _timing(timing, scoring_started, total),
    }
    results = json_safe(results)
    if output is not None:
        output.write_results(results)
    return results


def _documents_as_units(documents: list[DocumentComparison], protocol: str) -> bool:
    scored = sum(d.divergences is not None for d in documents)
    return protocol != "llama-cpp" and scored >= 2


def _stderr_method(documents: list[DocumentComparison], protocol: str) -> str:
    if _documents_as_units(documents, protocol):
        return "delta method for a ratio of sums, with documents as sampling units"
    return "i.i.d. per-token standard error"


def _corpus_metrics(documents: list[DocumentComparison], protocol: str, estimate: str) -> dict:
    scored = [d.divergences for d in documents if d.divergences is not None]
    if not scored:
        raise ScoringError(
            f"no document had two or more tokens ({len(documents)} skipped); nothing was compared"
        )
    documents_as_units = _documents_as_units(documents, protocol)
    metrics = summarize(scored, documents_as_units=documents_as_units, estimate=estimate)
    metrics["num_documents"] = len(documents)
    metrics["num_skipped"] = len(documents) - len(scored)
    return metrics


def _vocabulary_record(vocabulary: SharedVocabulary, options: ComparisonOptions, reference) -> dict:
    record = vocabulary.record()
    record["model_dropped_mass"] = options.dropped.record()
    if isinstance(reference, LiveReference):
        record["reference_dropped_mass"] = reference.dropped.record()
    else:
        mass = reference.dropped_mass()
        record["reference_dropped_mass"] = (
            {"mean": float(mass.mean()), "max": float(mass.max())} if np.any(mass) else None
        )
    return record


def _check_output_is_new(path: Path) -> None:
    if (path / CONFIG_FILE).exists():
        raise ConfigError(
            f"--output {str(path)!r} already holds the results of a run; choose another "
            "--output directory or delete this one"
        )


def _timing(timing: dict, scoring_started: float, total: int) -> dict:
    finished = time.perf_counter()
    scoring_seconds = finished - scoring_started
    return {
        "load_seconds": timing["load_seconds"],
        "scoring_seconds": scoring_seconds,
        "wall_seconds": finished - timing["started"],
        "tokens_scored": total,
        "tokens_per_second": total / scoring_seconds if scoring_seconds > 0 else 0.0,
    }
