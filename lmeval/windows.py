"""Cut token sequences into model windows so that every target token is scored once.

A :class:`Window` is one model input of T tokens. Position ``i`` predicts
``target_ids[i]``, the token that follows ``input_ids[: i + 1]``; only positions from
``score_start`` on are scored, the rest are context. All functions here are pure and
work on plain lists of token ids.

Document protocols (``rolling``, ``sliding``) predict every token of a document, the
first one from a prefix token (BOS, or EOS where the tokenizer has no BOS). Write the
document as ``seq = [prefix] + tokens``: then ``seq[j]`` is the input that predicts
``tokens[j]``, and a window over ``seq[a:b]`` has the targets ``tokens[a:b]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

PROTOCOLS = ("rolling", "sliding", "llama-cpp")


@dataclass(frozen=True)
class Window:
    """One model input and the targets it scores.

    Attributes:
        input_ids: the T tokens fed to the model.
        target_ids: the T next tokens; ``target_ids[i]`` follows ``input_ids[: i + 1]``.
        score_start: positions ``score_start .. T - 1`` are scored.
        first_target: index, in the document's token list, of the first scored target.
        document: index of the document (or llama.cpp chunk) the window belongs to.
    """

    input_ids: list[int]
    target_ids: list[int]
    score_start: int
    first_target: int
    document: int = 0

    @property
    def num_scored(self) -> int:
        return len(self.target_ids) - self.score_start


def _document_window(
    seq: list[int], start: int, end: int, first_target: int, document: int
) -> Window:
    """Build the window over ``seq[start:end]`` that scores ``tokens[first_target:end]``."""
    return Window(
        input_ids=seq[start:end],
        target_ids=seq[start + 1 : end + 1],
        score_start=first_target - start,
        first_target=first_target,
        document=document,
    )


def rolling_windows(
    tokens: list[int], prefix_token: int, window_size: int, document: int = 0
) -> list[Window]:
    """Cut a document into disjoint windows of ``window_size`` predicted tokens.

    This is lm-evaluation-harness's ``loglikelihood_rolling`` with a context of one
    token: the first window is ``[prefix] + tokens[: window_size - 1]``; each later full
    window is conditioned on the one token before it; a last, partial window takes the
    already-scored tokens before it as context, up to ``window_size`` inputs.
    """
    _check_window_size(window_size)
    seq = [prefix_token, *tokens]
    num_tokens = len(tokens)
    windows = []
    scored = 0
    while scored < num_tokens:
        end = min(num_tokens, scored + window_size)
        start = max(0, end - window_size)
        windows.append(_document_window(seq, start, end, scored, document))
        scored = end
    return windows


def sliding_windows(
    tokens: list[int],
    prefix_token: int,
    window_size: int,
    stride: int,
    document: int = 0,
) -> list[Window]:
    """Cut a document into windows of ``window_size`` inputs advanced by ``stride``.

    The first window scores all its targets; each later window scores only the targets
    no earlier window scored, so each of them has at least ``window_size - stride``
    tokens of context. This is the strided perplexity of the transformers guide, with
    the first token scored (from the prefix) and no token counted twice or dropped.
    """
    _check_window_size(window_size)
    if not 1 <= stride <= window_size:
        raise ValueError(f"stride must be in 1..{window_size}, got {stride}")
    seq = [prefix_token, *tokens]
    num_tokens = len(tokens)
    windows = []
    start = 0
    scored = 0
    while scored < num_tokens:
        end = min(num_tokens, start + window_size)
        windows.append(_document_window(seq, start, end, scored, document))
        scored = end
        start += stride
    return windows


def llama_cpp_chunks(stream: list[int], window_size: int, bos_token: int | None) -> list[Window]:
    """Cut one token stream into llama.cpp ``llama-perplexity`` chunks.

    The stream is cut into ``len(stream) // window_size`` disjoint chunks (a last,
    partial chunk is dropped). Where ``bos_token`` is given, it replaces the first token
    of every chunk. Only the second half of each chunk is scored: positions
    ``window_size // 2 .. window_size - 2`` predicting the tokens after them, which is
    ``window_size - 1 - window_size // 2`` targets per chunk. Each chunk is its own
    "document" in the returned windows.
    """
    if window_size < 2:
        raise ValueError(f"window_size must be at least 2, got {window_size}")
    first_scored = window_size // 2
    windows = []
    for index in range(len(stream) // window_size):
        begin = index * window_size
        chunk = stream[begin : begin + window_size]
        if bos_token is not None:
            chunk[0] = bos_token
        windows.append(
            Window(
                input_ids=chunk[:-1],
                target_ids=chunk[1:],
                score_start=first_scored,
                first_target=begin + first_scored + 1,
                document=index,
            )
        )
    return windows


def iter_scored_positions(window: Window) -> Iterator[int]:
    """Yield the document token index of every target the window scores."""
    yield from range(window.first_target, window.first_target + window.num_scored)


def _check_window_size(window_size: int) -> None:
    if window_size < 1:
        raise ValueError(f"window_size must be at least 1, got {window_size}")
