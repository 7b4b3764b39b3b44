"""Run a model and a reference on identical token windows and compare them chunk by chunk.

Shapes: B windows per batch, C scored positions per logits chunk, V the compared
vocabulary (see :class:`SharedVocabulary`).

Both models see the same windows in the same batches.
:meth:`lmeval.scoring.WindowScorer.logit_chunks` yields the float32 logits of the
scored positions C at a time, in the same order for two scorers with the same batch
and chunk sizes. A comparison therefore keeps a few ``[C, V]`` tensors in memory at
once, never the logits of a whole window. The reference side is either a second model
(:class:`LiveReference`) or a reference cache (:mod:`lmeval.reference_cache`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from lmeval import kl
from lmeval.errors import ConfigError, ScoringError, VocabularyError
from lmeval.kl import ReferenceChunk, TokenDivergences
from lmeval.perplexity import DocumentResult, Unit, group_units
from lmeval.scoring import WindowScorer
from lmeval.windows import Window

logger = logging.getLogger(__name__)

#: Bytes of one ``[C, V]`` float32 tensor in a comparison. About ten such tensors
#: (both sides' logits and logprobs, and the terms of each divergence) exist at once.
KL_CHUNK_BYTES = 32 * 2**20
#: Tokens of context shown before each worst token.
CONTEXT_TOKENS = 12
#: Most probable tokens of each model shown beside each worst token.
WORST_TOP_TOKENS = 3


def default_kl_chunk_size(vocabulary_size: int) -> int:
    """Return how many positions fit one ``[C, V]`` float32 tensor of :data:`KL_CHUNK_BYTES`."""
    return max(1, KL_CHUNK_BYTES // (4 * vocabulary_size))


# Vocabularies ----------------------------------------------------------------------


def token_list(tokenizer) -> list[str | None]:
    """Return the tokenizer's token for every id ``0 .. max id``, None for unused ids."""
    vocabulary = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * (max(vocabulary.values(), default=-1) + 1)
    for token, token_id in vocabulary.items():
        tokens[token_id] = token
    return tokens


@dataclass(frozen=True)
class SharedVocabulary:
    """The token ids ``0 .. size - 1`` on which two models are compared.

    ``size`` is the number of ids the shared tokenizer has. An output layer may have
    more rows than that (padding rows, added so the matrix size is a round number).
    Those rows are dropped and the distribution is renormalized over the ``size``
    tokenizer ids, on both sides, so that two models with different padding compare.

    Attributes:
        size: tokenizer ids compared (V).
        model_rows: rows of the model's output layer (None when only a reference
            cache is being written).
        reference_rows: rows of the reference's output layer.
    """

    size: int
    model_rows: int | None
    reference_rows: int

    def record(self) -> dict:
        """Describe the comparison's vocabulary for results.json."""
        dropped = {
            side: rows - self.size
            for side, rows in (("model", self.model_rows), ("reference", self.reference_rows))
            if rows is not None and rows > self.size
        }
        if dropped:
            parts = [f"{count} extra output rows of the {side}" for side, count in dropped.items()]
            note = (
                f"compared on the {self.size} tokenizer ids; the {' and '.join(parts)} were "
                "dropped and the distribution renormalized over the tokenizer ids"
            )
        else:
            note = f"compared on all {self.size} tokenizer ids, which are all output rows"
        return {
            "compared_size": self.size,
            "model_output_rows": self.model_rows,
            "reference_output_rows": self.reference_rows,
            "renormalized": sorted(dropped),
            "note": note,
        }


def check_vocabularies(
    model_tokens: Sequence[str | None],
    reference_tokens: Sequence[str | None],
    model_rows: int | None,
    reference_rows: int,
) -> SharedVocabulary:
    """Check that two tokenizers map every id to the same token and return the shared ids.

    Args:
        model_tokens, reference_tokens: id -> token lists (see :func:`token_list`).
        model_rows, reference_rows: rows of each output layer.

    Raises:
        VocabularyError: at the first id that the two tokenizers map differently, or
            when an output layer has fewer rows than the tokenizer has ids.
    """
    for token_id, (mine, theirs) in enumerate(
        itertools.zip_longest(model_tokens, reference_tokens)
    ):
        if mine != theirs:
            raise VocabularyError(
                f"the tokenizers differ at id {token_id}: the model's maps it to {mine!r}, "
                f"the reference's to {theirs!r} (vocabularies of {len(model_tokens)} and "
                f"{len(reference_tokens)} ids); KL divergence compares distributions over "
                "the same tokens, so compare models that share a tokenizer"
            )
    size = len(reference_tokens)
    for side, rows in (("model", model_rows), ("reference", reference_rows)):
        if rows is not None and rows < size:
            raise VocabularyError(
                f"the {side}'s output layer has {rows} rows but its tokenizer has {size} ids, "
                f"so it cannot score ids {rows} to {size - 1}; check that the tokenizer "
                "belongs to the model"
            )
    return SharedVocabulary(size, model_rows, reference_rows)


def shared_logprobs(
    logits: torch.Tensor, vocabulary_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-softmax ``[C, rows]`` logits over the first ``vocabulary_size`` ids.

    Returns:
        The ``[C, V]`` float32 logprobs, and the ``[C]`` float64 probability that the
        full softmax put on the dropped rows (None when no row is dropped).
    """
    logits = logits.float()
    if logits.shape[-1] == vocabulary_size:
        return torch.log_softmax(logits, dim=-1), None
    shared = logits[:, :vocabulary_size]
    shared_log_mass = torch.logsumexp(shared, dim=-1) - torch.logsumexp(logits, dim=-1)
    return torch.log_softmax(shared, dim=-1), -torch.expm1(shared_log_mass.double())


@dataclass
class DroppedMass:
    """Running mean and maximum of the probability one side put on dropped output rows."""

    total: float = 0.0
    maximum: float = 0.0
    count: int = 0

    def add(self, mass: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(mass.cpu() if isinstance(mass, torch.Tensor) else mass)
        self.total += float(values.sum(dtype=np.float64))
        self.maximum = max(self.maximum, float(values.max(initial=0.0)))
        self.count += len(values)

    def record(self) -> dict | None:
        if self.count == 0:
            return None
        return {"mean": self.total / self.count, "max": self.maximum}

    def merge(self, other: DroppedMass) -> None:
        """Add the positions counted by ``other`` (another rank's)."""
        self.total += other.total
        self.maximum = max(self.maximum, other.maximum)
        self.count += other.count


# The reference side ----------------------------------------------------------------


class ReferenceSide(Protocol):
    """A source of the reference's distributions, chunk by chunk."""

    def chunks(
        self, window_indices: Sequence[int], batch: Sequence[Window]
    ) -> Iterator[ReferenceChunk]:
        """Yield the reference at the batch's scored positions, in the chunks of the
        model's scorer. ``window_indices`` are the batch's indices in the run's list of
        windows."""
        ...


class ChunkRecorder(Protocol):
    """A receiver of every reference chunk, such as a reference cache writer."""

    def write(
        self, window_indices: Sequence[int], begin: int, end: int, chunk: ReferenceChunk
    ) -> None: ...


class LiveReference:
    """The reference side computed by running the reference model.

    Args:
        scorer: a scorer of the reference model, with the model scorer's batch and
            chunk sizes.
        vocabulary_size: V, the shared tokenizer ids.
        context: a function returning a context manager that each chunk is computed
            in, e.g. one that disables a model's PEFT adapters so that the model is
            its own reference.
        recorder: receives every chunk (see :class:`ChunkRecorder`).
    """

    def __init__(
        self,
        scorer: WindowScorer,
        vocabulary_size: int,
        *,
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        recorder: ChunkRecorder | None = None,
    ) -> None:
        self.scorer = scorer
        self.vocabulary_size = vocabulary_size
        self.context = context or contextlib.nullcontext
        self.recorder = recorder
        self.dropped = DroppedMass()

    def chunks(
        self, window_indices: Sequence[int], batch: Sequence[Window]
    ) -> Iterator[ReferenceChunk]:
        logit_chunks = self.scorer.logit_chunks(batch)
        while True:
            # Each step of the generator runs the model, so each runs in the context.
            with self.context(), torch.no_grad():
                logit_chunk = next(logit_chunks, None)
                if logit_chunk is None:
                    return
                logprobs, dropped = shared_logprobs(logit_chunk.logits, self.vocabulary_size)
                chunk = ReferenceChunk.from_logprobs(logprobs, logit_chunk.targets)
            if dropped is not None:
                chunk.dropped_mass = dropped
                self.dropped.add(dropped)
            if self.recorder is not None:
                self.recorder.write(window_indices, logit_chunk.begin, logit_chunk.end, chunk)
            yield chunk


def run_reference(
    scorer: WindowScorer,
    reference: ReferenceSide,
    windows: Sequence[Window],
    progress: Callable[[int], None] | None = None,
    first_index: int = 0,
) -> None:
    """Run only the reference over ``windows`` (to fill a reference cache).

    ``first_index`` is the index of ``windows[0]`` in the run's list of windows.
    """
    for batch_indices in scorer.batches(windows):
        batch = [windows[i] for i in batch_indices]
        for _chunk in reference.chunks([first_index + i for i in batch_indices], batch):
            pass
        if progress is not None:
            progress(sum(window.num_scored for window in batch))


# Worst tokens ----------------------------------------------------------------------


@dataclass
class WorstToken:
    """One scored token with a large divergence, and what both models predicted there."""

    value: float
    document: int
    position: int
    target_id: int
    context_ids: list[int]
    kl_model_ref: float
    kl_ref_model: float
    model_top: list[tuple[int, float]]
    reference_top: list[tuple[int, float]]


class WorstTokens:
    """Keep the ``capacity`` scored tokens with the largest positive divergence ``key``.

    Memory stays at ``capacity`` records whatever the corpus size: each chunk offers
    only its own largest values. Among equal values the earlier token (lower document,
    then position) ranks higher, so the kept set does not depend on the order in which
    tokens are offered, and ranks of a sharded run merge to the single-process set.
    """

    def __init__(self, capacity: int, key: str = "kl_ref_model") -> None:
        if key not in kl.DIRECTIONS:
            raise ValueError(f"key must be one of {', '.join(kl.DIRECTIONS)}, got {key!r}")
        self.capacity = capacity
        self.key = key
        # Min-heap on (value, -document, -position): the root is the weakest kept token.
        self._heap: list[tuple[float, int, int, WorstToken]] = []

    def offer(
        self,
        part: TokenDivergences,
        begin: int,
        batch: Sequence[Window],
        model_logprobs: torch.Tensor,
        reference: ReferenceChunk,
    ) -> None:
        """Consider the C positions of one chunk that starts at batch position ``begin``."""
        if self.capacity == 0:
            return
        values = getattr(part, self.key)
        # Tokens with a divergence of 0 (or rounded below it) are never listed. A value
        # equal to the weakest kept one may still win on the tie-break, so it stays.
        candidates = np.flatnonzero(values > 0.0)
        if len(self._heap) == self.capacity:
            candidates = candidates[values[candidates] >= self._heap[0][0]]
        if len(candidates) > self.capacity:
            cut = np.partition(values[candidates], -self.capacity)[-self.capacity]
            candidates = candidates[values[candidates] >= cut]
        for index in candidates:
            self._push(self._record(part, int(index), begin, batch, model_logprobs, reference))

    def _push(self, record: WorstToken) -> None:
        item = (record.value, -record.document, -record.position, record)
        if len(self._heap) < self.capacity:
            heapq.heappush(self._heap, item)
        elif item[:3] > self._heap[0][:3]:
            heapq.heapreplace(self._heap, item)

    def _record(self, part, index, begin, batch, model_logprobs, reference) -> WorstToken:
        window, offset = _window_at(batch, begin + index)
        input_position = window.score_start + offset
        model_top = model_logprobs[index].topk(min(WORST_TOP_TOKENS, model_logprobs.shape[-1]))
        reference_ids = reference.top_ids[index, :WORST_TOP_TOKENS].tolist()
        reference_logprobs = reference.top_logprobs[index, :WORST_TOP_TOKENS].tolist()
        return WorstToken(
            value=float(getattr(part, self.key)[index]),
            document=window.document,
            position=window.first_target + offset,
            target_id=window.target_ids[input_position],
            context_ids=window.input_ids[
                max(0, input_position - CONTEXT_TOKENS + 1) : input_position + 1
            ],
            kl_model_ref=float(part.kl_model_ref[index]),
            kl_ref_model=float(part.kl_ref_model[index]),
            model_top=list(
                zip(model_top.indices.tolist(), model_top.values.exp().tolist(), strict=True)
            ),
            reference_top=[
                (token_id, float(np.exp(logprob)))
                for token_id, logprob in zip(reference_ids, reference_logprobs, strict=True)
            ],
        )

    def kept(self) -> list[WorstToken]:
        """Return the kept tokens, in no particular order."""
        return [item[-1] for item in self._heap]

    def merge(self, records: Sequence[WorstToken]) -> None:
        """Keep the largest of ``records`` (another rank's :meth:`kept`) too."""
        for record in records:
            self._push(record)

    def records(self, tokenizer, documents: Sequence[DocumentResult]) -> list[dict]:
        """Return the kept tokens, largest first, with their text decoded for results.json."""
        by_index = {document.index: document for document in documents}
        worst = sorted(self.kept(), key=lambda r: (-r.value, r.document, r.position))
        return [_worst_record(record, tokenizer, by_index.get(record.document)) for record in worst]


def _worst_record(record: WorstToken, tokenizer, document: DocumentResult | None) -> dict:
    def predictions(pairs):
        return [
            {"token": tokenizer.decode([token_id]), "id": token_id, "probability": probability}
            for token_id, probability in pairs
        ]

    return {
        "document": record.document,
        "document_id": None if document is None else document.id,
        "title": None if document is None else document.title,
        "position": record.position,
        "token": tokenizer.decode([record.target_id]),
        "token_id": record.target_id,
        "context": tokenizer.decode(record.context_ids),
        "kl_model_ref": record.kl_model_ref,
        "kl_ref_model": record.kl_ref_model,
        "model_top": predictions(record.model_top),
        "reference_top": predictions(record.reference_top),
    }


def _window_at(batch: Sequence[Window], position: int) -> tuple[Window, int]:
    """Return the window holding the batch's ``position``-th scored target, and its
    index among that window's scored targets."""
    for window in batch:
        if position < window.num_scored:
            return window, position
        position -= window.num_scored
    raise IndexError(position)


# The comparison loop ---------------------------------------------------------------


@dataclass
class ComparisonOptions:
    """Tracking options of a comparison, beside the per-token values.

    Attributes:
        worst: keeps the tokens with the largest divergence, or None.
        dropped: accumulates the probability the model put on dropped output rows.
        progress: called with the number of tokens scored after each batch.
    """

    worst: WorstTokens | None = None
    dropped: DroppedMass = field(default_factory=DroppedMass)
    progress: Callable[[int], None] | None = None


def compare_windows(
    model_scorer: WindowScorer,
    reference: ReferenceSide,
    windows: Sequence[Window],
    vocabulary_size: int,
    *,
    first_index: int = 0,
    options: ComparisonOptions | None = None,
) -> list[TokenDivergences]:
    """Compare the model with the reference on ``windows``, one result per window, in order.

    Args:
        model_scorer: a scorer of the model.
        reference: the reference side, chunked like ``model_scorer``.
        windows: the windows to score.
        vocabulary_size: V, the shared tokenizer ids.
        first_index: index of ``windows[0]`` in the run's list of windows, by which a
            reference cache finds its rows.
        options: worst-token, dropped-mass and progress tracking.

    Raises:
        ScoringError: when a comparison gives NaN (the logits held NaN or +inf).
    """
    options = options or ComparisonOptions()
    results: list[TokenDivergences | None] = [None] * len(windows)
    for batch_indices in model_scorer.batches(windows):
        batch = [windows[i] for i in batch_indices]
        run_indices = [first_index + i for i in batch_indices]
        compared = _compare_batch(
            model_scorer, reference, batch, run_indices, vocabulary_size, options
        )
        begin = 0
        for index, window in zip(batch_indices, batch, strict=True):
            results[index] = compared.slice(begin, begin + window.num_scored)
            begin += window.num_scored
        if options.progress is not None:
            options.progress(begin)
    return results


def _compare_batch(
    model_scorer: WindowScorer,
    reference: ReferenceSide,
    batch: Sequence[Window],
    run_indices: Sequence[int],
    vocabulary_size: int,
    options: ComparisonOptions,
) -> TokenDivergences:
    parts = []
    with torch.no_grad():
        model_chunks = model_scorer.logit_chunks(batch)
        reference_chunks = reference.chunks(run_indices, batch)
        for model_chunk, reference_chunk in zip(model_chunks, reference_chunks, strict=True):
            logprobs, dropped = shared_logprobs(model_chunk.logits, vocabulary_size)
            if dropped is not None:
                options.dropped.add(dropped)
            reference_chunk = reference_chunk.to(logprobs.device)
            part = kl.compare_chunk(logprobs, model_chunk.targets, reference_chunk)
            _check_no_nan(part, model_scorer, batch, model_chunk.begin)
            if options.worst is not None:
                options.worst.offer(part, model_chunk.begin, batch, logprobs, reference_chunk)
            parts.append(part)
    return TokenDivergences.concatenate(parts)


def _check_no_nan(
    part: TokenDivergences, scorer: WindowScorer, batch: Sequence[Window], begin: int
) -> None:
    found = part.first_nan()
    if found is None:
        return
    name, index = found
    document, position = scorer.locate(batch, begin + index)
    raise ScoringError(
        f"the comparison gave NaN for {name} in document {document} at token {position}, "
        "so a model returned NaN or +inf logits; check the weights and dtype (float16 "
        "overflows easily; try --dtype float32 or bfloat16)"
    )


# Documents -------------------------------------------------------------------------


@dataclass
class DocumentComparison:
    """One document's metadata and per-token comparison (None when it was skipped)."""

    result: DocumentResult
    divergences: TokenDivergences | None

    def row(self, estimate: str) -> dict:
        """Return the JSON row written to documents.jsonl."""
        result = self.result
        row = {
            "index": result.index,
            "id": result.id,
            "title": result.title,
            "num_tokens": result.num_tokens,
            "num_words": result.num_words,
            "num_bytes": result.num_bytes,
            "skipped": result.skipped,
        }
        if self.divergences is not None:
            summary = kl.summarize([self.divergences], documents_as_units=False, estimate=estimate)
            row["metrics"] = json_safe(summary)
        return row


def compare_units(
    model_scorer: WindowScorer,
    reference: ReferenceSide,
    units: Sequence[Unit],
    vocabulary_size: int,
    *,
    options: ComparisonOptions | None = None,
    windows_per_group: int = 64,
    on_document: Callable[[DocumentComparison], None] | None = None,
) -> list[DocumentComparison]:
    """Compare the model with the reference on every unit (document or chunk), in order.

    Units are compared in groups of about ``windows_per_group`` windows, so that
    ``on_document`` is called for each document soon after it is finished.

    NOTE: the per-token values (about 100 bytes per token) are kept for every
    document, because the run's percentiles are computed over all of them. Memory for
    logits is bounded by the chunk size, but this part grows with the corpus.
    """
    return compare_groups(
        model_scorer,
        reference,
        indexed_groups(units, windows_per_group),
        vocabulary_size,
        options=options,
        on_document=on_document,
    )


def indexed_groups(units: Sequence[Unit], windows_per_group: int) -> list[tuple[int, list[Unit]]]:
    """Group units as :func:`lmeval.perplexity.group_units` does, each group with the
    index of its first window in the run's list of windows."""
    groups = []
    first_index = 0
    for group in group_units(units, windows_per_group):
        groups.append((first_index, group))
        first_index += sum(len(unit.windows) for unit in group)
    return groups


def compare_groups(
    model_scorer: WindowScorer,
    reference: ReferenceSide,
    groups: Sequence[tuple[int, list[Unit]]],
    vocabulary_size: int,
    *,
    options: ComparisonOptions | None = None,
    on_document: Callable[[DocumentComparison], None] | None = None,
) -> list[DocumentComparison]:
    """Compare groups from :func:`indexed_groups`, each in its own batches; see
    :func:`compare_units`. A rank of a sharded run compares a subset of the groups."""
    options = options or ComparisonOptions()
    documents = []
    for first_index, group in groups:
        windows = [window for unit in group for window in unit.windows]
        parts = iter(
            compare_windows(
                model_scorer,
                reference,
                windows,
                vocabulary_size,
                first_index=first_index,
                options=options,
            )
        )
        for unit in group:
            divergences = None
            if unit.result.skipped is None:
                divergences = TokenDivergences.concatenate([next(parts) for _ in unit.windows])
            document = DocumentComparison(unit.result, divergences)
            documents.append(document)
            if on_document is not None:
                on_document(document)
    return documents


def json_safe(value):
    """Replace non-finite floats, which JSON cannot hold, by the strings "inf" and
    "-inf" (and NaN by None), in nested dicts and lists."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, float) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def adapters_disabled(model) -> contextlib.AbstractContextManager:
    """Return a context manager in which ``model`` runs without its PEFT adapters.

    Works for a ``peft.PeftModel`` and for a transformers model with adapters loaded
    through its PEFT integration (``model.add_adapter`` or ``load_adapter``).

    Raises:
        ConfigError: when the model has no PEFT adapters.
    """
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter()
    if getattr(model, "_hf_peft_config_loaded", False):
        # NOTE: not run yet: transformers 5.25 loads adapters this way only with
        # peft >= 0.22, and the tests ran with peft 0.21.2 (PeftModel path only).
        return _transformers_adapters_disabled(model)
    raise ConfigError(
        f"{type(model).__name__} has no PEFT adapters to disable, so it cannot be its own "
        "reference; pass a frozen reference model (e.g. copy.deepcopy(model) before training)"
    )


@contextlib.contextmanager
def _transformers_adapters_disabled(model):
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()
