"""Perplexity of a model on a corpus: tokenize, window, score, aggregate.

This is the library entry point behind ``lmeval ppl``; it can be called from Python
with the same results. Per-document sums are float64 and the corpus metrics divide
once, so they are token-weighted and never a mean of per-window means.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from lmeval import metrics
from lmeval.data import Corpus, Document
from lmeval.errors import ConfigError, ScoringError
from lmeval.models import LoadedModel
from lmeval.scoring import WindowScorer, auto_batch_size, prefix_token_id
from lmeval.windows import (
    PROTOCOLS,
    Window,
    llama_cpp_chunks,
    rolling_windows,
    sliding_windows,
)

logger = logging.getLogger(__name__)

#: Window size used when neither the user nor the model's position limit sets one.
DEFAULT_WINDOW_SIZE = 2048
#: Batches of windows scored together (sorted longest first) before the finished
#: documents among them are reported, so a killed run loses at most this much work.
WINDOWS_PER_GROUP = 4


@dataclass(frozen=True)
class ScoringSettings:
    """How documents are cut into windows and batched.

    Attributes:
        protocol: "rolling", "sliding" or "llama-cpp" (see :mod:`lmeval.windows`).
        window_size: model inputs per window; None uses the model's position limit,
            capped at :data:`DEFAULT_WINDOW_SIZE`.
        stride: advance of ``sliding`` windows; None uses half the window.
        batch_size: windows per forward pass, or "auto".
        chunk_size: positions per logits chunk; None picks one from the vocabulary.
        padding_side: "right" or "left".
        max_chunks: with ``llama-cpp``, score only the first N chunks (llama-perplexity's
            ``--chunks N``); None scores all.
        with_entropy: also compute each token's predictive entropy (one more pass over
            the vocabulary per token).
    """

    protocol: str = "rolling"
    window_size: int | None = None
    stride: int | None = None
    batch_size: int | str = 1
    chunk_size: int | None = None
    padding_side: str = "right"
    max_chunks: int | None = None
    with_entropy: bool = False


#: Per-token arrays of a :class:`DocumentResult`, never written to documents.jsonl.
TOKEN_ARRAYS = ("token_nll", "correct", "top1_prob", "entropy", "target_ids", "window_position")


@dataclass
class DocumentResult:
    """Sums over one document's scored tokens (or one llama.cpp chunk).

    The per-token arrays are in target order. ``window_position[k]`` is the index,
    within its window's input, of the position that predicts token k, so the model saw
    ``window_position[k] + 1`` tokens (the prefix token included) to predict it.
    ``entropy`` is None unless the settings asked for it.
    """

    index: int
    id: str
    title: str | None
    num_tokens: int
    num_words: int
    num_bytes: int
    sum_nll: float = 0.0
    sum_nll_squared: float = 0.0
    num_correct: int = 0
    skipped: str | None = None
    token_nll: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)
    top1_prob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    entropy: np.ndarray | None = field(default=None, repr=False)
    target_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    window_position: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    @classmethod
    def from_row(cls, row: dict) -> DocumentResult:
        """Rebuild a result (without per-token arrays) from its documents.jsonl row."""
        names = {f.name for f in fields(cls)} - set(TOKEN_ARRAYS)
        return cls(**{name: row[name] for name in names if name in row})

    def row(self) -> dict:
        """Return the JSON row written to documents.jsonl."""
        row = {
            "index": self.index,
            "id": self.id,
            "title": self.title,
            "num_tokens": self.num_tokens,
            "num_words": self.num_words,
            "num_bytes": self.num_bytes,
            "skipped": self.skipped,
        }
        if self.skipped is None:
            mean_nll = self.sum_nll / self.num_tokens
            row |= {
                "sum_nll": self.sum_nll,
                "sum_nll_squared": self.sum_nll_squared,
                "mean_nll": mean_nll,
                "perplexity": metrics.perplexity(mean_nll),
                "num_correct": self.num_correct,
                "accuracy": self.num_correct / self.num_tokens,
            }
        return row


@dataclass
class Unit:
    """A document (or chunk) with its windows, before scoring."""

    result: DocumentResult
    windows: list[Window]

    @property
    def num_scored(self) -> int:
        return sum(window.num_scored for window in self.windows)


def resolve_settings(settings: ScoringSettings, loaded: LoadedModel) -> ScoringSettings:
    """Fill in defaults that depend on the model and check limits.

    Raises:
        ConfigError: on an unknown protocol, a window above the model's position
            limit, or an invalid stride, batch size, padding side, logits chunk
            size or chunk limit.
        ScoringError: for a document protocol, when the tokenizer has neither a BOS
            nor an EOS token to predict a document's first token from.
    """
    if settings.protocol not in PROTOCOLS:
        raise ConfigError(
            f"unknown protocol {settings.protocol!r}; choose one of {', '.join(PROTOCOLS)}"
        )
    window_size = _resolve_window_size(settings, loaded.max_positions)
    stride = _resolve_stride(settings, window_size)
    batch_size = settings.batch_size
    if batch_size == "auto":
        batch_size = auto_batch_size(loaded.model, window_size)
        logger.info("--batch-size auto chose %d", batch_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
    _check_options(settings)
    if settings.protocol != "llama-cpp":
        _check_prefix_token(loaded)
    return dataclasses.replace(
        settings, window_size=window_size, stride=stride, batch_size=batch_size
    )


def _resolve_window_size(settings: ScoringSettings, limit: int | None) -> int:
    window_size = settings.window_size
    if window_size is None:
        window_size = min(limit or DEFAULT_WINDOW_SIZE, DEFAULT_WINDOW_SIZE)
    # A llama-cpp chunk of W tokens scores W - 1 - W // 2 of them: none when W is 2.
    minimum = 3 if settings.protocol == "llama-cpp" else 1
    if window_size < minimum:
        raise ConfigError(
            f"--window-size must be at least {minimum} with --protocol "
            f"{settings.protocol}, got {window_size}"
        )
    if limit is not None and window_size > limit:
        raise ConfigError(
            f"--window-size {window_size} is above the model's position limit of {limit}; "
            f"pass --window-size {limit} or less (long documents are split into windows)"
        )
    return window_size


def _resolve_stride(settings: ScoringSettings, window_size: int) -> int | None:
    stride = settings.stride
    if settings.protocol != "sliding":
        if stride is not None:
            raise ConfigError(
                f"--stride applies to the sliding protocol, not {settings.protocol!r}"
            )
        return None
    if stride is None:
        stride = max(1, window_size // 2)
    if not 1 <= stride <= window_size:
        raise ConfigError(f"--stride must be in 1..{window_size}, got {stride}")
    return stride


def _check_options(settings: ScoringSettings) -> None:
    if settings.padding_side not in ("right", "left"):
        raise ConfigError(
            f"invalid --padding-side {settings.padding_side!r}; use one of right, left"
        )
    if settings.chunk_size is not None and settings.chunk_size < 1:
        raise ConfigError(f"--logits-chunk-size must be at least 1, got {settings.chunk_size}")
    if settings.max_chunks is not None and settings.max_chunks < 1:
        raise ConfigError(f"--limit must be at least 1 chunk, got {settings.max_chunks}")


def _check_prefix_token(loaded: LoadedModel) -> None:
    """Fail before scoring when the tokenizer has no token to predict a first token from."""
    try:
        prefix_token_id(loaded.tokenizer)
    except ScoringError as error:
        raise ScoringError(f"model {loaded.identity.get('spec')!r}: {error}") from error


def score_corpus(
    loaded: LoadedModel,
    corpus: Corpus,
    settings: ScoringSettings,
    *,
    on_document: Callable[[DocumentResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
    skip: Iterable[int] = (),
) -> list[DocumentResult]:
    """Score every document of ``corpus`` and return one result per document.

    Args:
        loaded: the model and tokenizer.
        corpus: the documents.
        settings: resolved settings (see :func:`resolve_settings`).
        on_document: called with each finished document, in corpus order.
        progress: called with the number of tokens scored after each batch.
        skip: indices of documents not to score (e.g. already scored by a run that
            is being resumed); they are left out of the returned list.
    """
    units = build_units(loaded, corpus.documents, settings)
    skipped_indices = set(skip)
    units = [unit for unit in units if unit.result.index not in skipped_indices]
    return score_units(loaded, units, settings, on_document=on_document, progress=progress)


def score_units(
    loaded: LoadedModel,
    units: Sequence[Unit],
    settings: ScoringSettings,
    *,
    on_document: Callable[[DocumentResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[DocumentResult]:
    """Score units from :func:`build_units`; see :func:`score_corpus`."""
    groups = group_units(list(units), WINDOWS_PER_GROUP * settings.batch_size)
    return score_groups(loaded, groups, settings, on_document=on_document, progress=progress)


def score_groups(
    loaded: LoadedModel,
    groups: Iterable[list[Unit]],
    settings: ScoringSettings,
    *,
    on_document: Callable[[DocumentResult], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[DocumentResult]:
    """Score groups of units formed by :func:`group_units`, each group in its own batches.

    A run sharded over ranks scores a subset of the groups that one process forms, so
    each batch, and therefore each document's values, stays the same.
    """
    scorer = WindowScorer(
        loaded.model,
        batch_size=settings.batch_size,
        chunk_size=settings.chunk_size,
        pad_token_id=_pad_token_id(loaded.tokenizer),
        padding_side=settings.padding_side,
        with_entropy=settings.with_entropy,
    )
    results = []
    for group in groups:
        _score_group(scorer, group, progress)
        for unit in group:
            results.append(unit.result)
            if on_document is not None:
                on_document(unit.result)
    return results


def build_units(
    loaded: LoadedModel, documents: Sequence[Document], settings: ScoringSettings
) -> list[Unit]:
    """Tokenize documents and cut them into windows by the chosen protocol."""
    if settings.protocol == "llama-cpp":
        return _llama_cpp_units(loaded, documents, settings.window_size, settings.max_chunks)
    prefix = prefix_token_id(loaded.tokenizer)
    encodings = _encode(loaded.tokenizer, [document.text for document in documents])
    units = []
    for index, (document, tokens) in enumerate(zip(documents, encodings, strict=True)):
        result = DocumentResult(
            index=index,
            id=document.id,
            title=document.title,
            num_tokens=len(tokens),
            num_words=document.num_words,
            num_bytes=document.num_bytes,
        )
        if len(tokens) < 2:
            result.skipped = "empty" if not tokens else "one token"
            units.append(Unit(result, []))
            continue
        if settings.protocol == "rolling":
            windows = rolling_windows(tokens, prefix, settings.window_size, index)
        else:
            windows = sliding_windows(tokens, prefix, settings.window_size, settings.stride, index)
        units.append(Unit(result, windows))
    return units


def _llama_cpp_units(
    loaded: LoadedModel,
    documents: Sequence[Document],
    window_size: int,
    max_chunks: int | None,
) -> list[Unit]:
    """Tokenize all text as one stream and cut it into llama.cpp chunks."""
    # Documents are joined as they are: a plain-text file read whole is one document.
    text = "".join(document.text for document in documents)
    stream = _encode(loaded.tokenizer, [text])[0]
    bos = loaded.tokenizer.bos_token_id if loaded.identity.get("add_bos_token") else None
    windows = llama_cpp_chunks(stream, window_size, bos)[:max_chunks]
    if not windows:
        raise ScoringError(
            f"the text has {len(stream)} tokens, fewer than one llama-cpp chunk of "
            f"{window_size}; pass a smaller --window-size or more text"
        )
    units = []
    for window in windows:
        scored = window.target_ids[window.score_start :]
        # NOTE: words and bytes of a chunk are counted on the decoded text of its
        # scored tokens, since only part of the chunk is scored.
        scored_text = loaded.tokenizer.decode(scored)
        result = DocumentResult(
            index=window.document,
            id=f"chunk-{window.document}",
            title=None,
            num_tokens=len(scored),
            num_words=len(scored_text.split()),
            num_bytes=len(scored_text.encode("utf-8")),
        )
        units.append(Unit(result, [window]))
    return units


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Tokenize without special tokens; the windows add the prefix token."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def group_units(units: Sequence[Unit], max_windows: int) -> Iterable[list[Unit]]:
    """Yield consecutive units holding about ``max_windows`` windows together."""
    group, count = [], 0
    for unit in units:
        group.append(unit)
        count += len(unit.windows)
        if count >= max_windows:
            yield group
            group, count = [], 0
    if group:
        yield group


def _score_group(scorer: WindowScorer, group: list[Unit], progress) -> None:
    windows = [window for unit in group for window in unit.windows]
    scores = iter(scorer.score(windows, progress))
    for unit in group:
        if unit.result.skipped is not None:
            continue
        parts = [next(scores) for _ in unit.windows]
        token_nll = np.concatenate([part.token_nll for part in parts])
        correct = np.concatenate([part.correct for part in parts])
        if len(token_nll) != unit.result.num_tokens:
            raise AssertionError(
                f"document {unit.result.index}: scored {len(token_nll)} of "
                f"{unit.result.num_tokens} tokens"
            )
        unit.result.token_nll = token_nll
        unit.result.correct = correct
        unit.result.top1_prob = np.concatenate([part.top1_prob for part in parts])
        if scorer.with_entropy:
            unit.result.entropy = np.concatenate([part.entropy for part in parts])
        unit.result.target_ids = np.concatenate(
            [np.asarray(w.target_ids[w.score_start :], dtype=np.int64) for w in unit.windows]
        )
        unit.result.window_position = np.concatenate(
            [np.arange(w.score_start, len(w.input_ids), dtype=np.int64) for w in unit.windows]
        )
        unit.result.sum_nll = float(token_nll.sum(dtype=np.float64))
        unit.result.sum_nll_squared = float((token_nll**2).sum(dtype=np.float64))
        unit.result.num_correct = int(correct.sum())


def corpus_metrics(documents: Sequence[DocumentResult], protocol: str) -> dict:
    """Aggregate document results into the corpus ``metrics`` object of results.json.

    Intervals are 95%: for document protocols, the delta method for a ratio with
    documents as sampling units; for llama-cpp chunks, the i.i.d. token standard
    error that llama-perplexity reports.
    """
    scored = [document for document in documents if document.skipped is None]
    counts = {
        "num_documents": len(documents),
        "num_skipped": len(documents) - len(scored),
        "num_tokens": sum(document.num_tokens for document in scored),
        "num_words": sum(document.num_words for document in scored),
        "num_bytes": sum(document.num_bytes for document in scored),
        "num_correct": sum(document.num_correct for document in scored),
    }
    if counts["num_tokens"] == 0:
        raise ScoringError(
            f"no document had two or more tokens ({counts['num_skipped']} skipped); "
            "nothing was scored"
        )
    sum_nll = sum(document.sum_nll for document in scored)
    nll, accuracy, per_word, per_byte = _intervals(scored, protocol)
    # NLL is never negative and accuracy is a fraction; normal intervals ignore both.
    nll, per_word, per_byte = (interval.clipped(0.0) for interval in (nll, per_word, per_byte))
    accuracy = accuracy.clipped(0.0, 1.0)
    values = {
        "perplexity": nll.mapped(metrics.perplexity),
        "mean_nll": nll,
        "word_perplexity": per_word.mapped(metrics.perplexity),
        "byte_perplexity": per_byte.mapped(metrics.perplexity),
        "bits_per_byte": per_byte.mapped(lambda x: x / np.log(2)),
        "accuracy": accuracy,
    }
    result = {}
    for name, interval in values.items():
        result[name] = interval.value
        result[f"{name}_interval"] = None if interval.low is None else [interval.low, interval.high]
    result["mean_nll_stderr"] = nll.stderr
    result["perplexity_stderr"] = None if nll.stderr is None else result["perplexity"] * nll.stderr
    result["accuracy_stderr"] = accuracy.stderr
    result["sum_nll"] = sum_nll
    result |= counts
    return result


def interval_method(protocol: str, num_scored_documents: int) -> str:
    """Describe how :func:`corpus_metrics` computed its intervals."""
    if protocol == "llama-cpp" or num_scored_documents < 2:
        return (
            "95% normal interval from the i.i.d. per-token standard error; Wilson score "
            "interval for accuracy"
        )
    return "95% normal interval, delta method for a ratio with documents as units"


def _intervals(scored: Sequence[DocumentResult], protocol: str):
    sum_nll = [document.sum_nll for document in scored]
    tokens = [document.num_tokens for document in scored]
    if protocol != "llama-cpp" and len(scored) >= 2:
        return (
            metrics.ratio_interval(sum_nll, tokens),
            metrics.ratio_interval([d.num_correct for d in scored], tokens),
            metrics.ratio_interval(sum_nll, [d.num_words for d in scored]),
            metrics.ratio_interval(sum_nll, [d.num_bytes for d in scored]),
        )
    num_tokens = sum(tokens)
    num_correct = sum(document.num_correct for document in scored)
    nll = metrics.mean_interval(
        sum(sum_nll), sum(document.sum_nll_squared for document in scored), num_tokens
    )
    accuracy = metrics.wilson_interval(num_correct, num_tokens)
    words = sum(document.num_words for document in scored)
    num_bytes = sum(document.num_bytes for document in scored)
    return (
        nll,
        accuracy,
        _rescaled(nll, num_tokens, words),
        _rescaled(nll, num_tokens, num_bytes),
    )


def _rescaled(interval: metrics.Interval, num_tokens: int, units: int) -> metrics.Interval:
    """Scale a per-token estimate to a per-word or per-byte one."""
    factor = num_tokens / units
    if interval.stderr is None:
        return metrics.Interval(interval.value * factor, None, None, None)
    return metrics.Interval(
        interval.value * factor,
        interval.stderr * factor,
        interval.low * factor,
        interval.high * factor,
    )
