"""Score windows with a causal language model: per-token NLL in bounded memory.

Shapes: B windows in a batch, T positions (the longest window in the batch), H hidden
size, V vocabulary, N scored positions in the batch, C positions per logits chunk.

The model's decoder runs once per batch and yields hidden states ``[B, T, H]``. Only
the N scored positions go through the output layer, C at a time, so peak memory for
logits grows with ``C x V`` and never with ``T x V``. Log-softmax runs in float32
whatever the model dtype; sums are taken in float64 by the caller.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from lmeval.errors import ScoringError
from lmeval.models import input_device
from lmeval.windows import Window

logger = logging.getLogger(__name__)

#: Bytes of float32 logits one chunk may hold (``C x V x 4``) before log-softmax.
#: Scoring keeps about three such tensors alive at once (this chunk, its exp in
#: logsumexp, the previous chunk). At 64 MiB, gemma3-270m scoring one 4096-token
#: window peaked at 1.89 GiB RSS on a 2-core CPU, against 2.26 GiB at 256 MiB.
CHUNK_BYTES = 64 * 2**20
MAX_AUTO_BATCH_SIZE = 64
#: Input tokens per forward pass that --batch-size auto aims at on a CPU. The matmuls
#: of a 2048-token window already keep the cores busy, so bigger batches only add
#: activation memory. On a 2-core AMD EPYC (Zen 4), SmolLM2 scored WikiText-2 12-23%
#: faster with one window of 2048 or four of 512 per batch than with the 23 to 64
#: windows that free memory allowed (the batch-size check in BENCHMARKS.md).
CPU_BATCH_TOKENS = 2048


@dataclass
class LogitChunk:
    """Logits of scored positions ``begin .. end - 1`` of a batch (window by window)."""

    logits: torch.Tensor  # [C, V] float32
    targets: torch.Tensor  # [C] token ids

    begin: int
    end: int


@dataclass
class TokenScores:
    """Per-token results for the scored targets of one window, in target order."""

    token_nll: np.ndarray  # [num_scored] float64, -log p(target)
    correct: np.ndarray  # [num_scored] bool, argmax == target
    top1_prob: np.ndarray  # [num_scored] float32, max_v p(v): the model's confidence
    entropy: np.ndarray | None = None  # [num_scored] float32, in nats, if requested


def default_chunk_size(vocab_size: int) -> int:
    """Return how many positions fit one logits chunk of :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class WindowScorer:
    """Run batches of windows through a model and return per-token NLL and top-1.

    Args:
        model: a causal LM in eval mode.
        batch_size: windows per forward pass.
        chunk_size: positions per logits chunk; None picks :func:`default_chunk_size`.
        pad_token_id: id placed in padded positions (never scored, masked out).
        padding_side: "right" or "left"; position ids follow the attention mask, so
            both give the same numbers.
        with_entropy: also return each position's predictive entropy (one more pass
            over the vocabulary per position).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        batch_size: int = 1,
        chunk_size: int | None = None,
        pad_token_id: int = 0,
        padding_side: str = "right",
        with_entropy: bool = False,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.model = model
        # With --device-map the layers sit on several devices; inputs go to the embeddings.
        self.device = input_device(model)
        self.batch_size = batch_size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.chunk_size = chunk_size or default_chunk_size(self.vocab_size)
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.with_entropy = with_entropy
        self.split_head = _head_matches_model(model)
        if not self.split_head:
            logger.warning(
                "%s does not compute logits as output layer(decoder(x)); scoring uses "
                "full forward passes, so memory grows with window x vocabulary",
                type(model).__name__,
            )

    @torch.inference_mode()
    def score(
        self,
        windows: Sequence[Window],
        progress: Callable[[int], None] | None = None,
    ) -> list[TokenScores]:
        """Score ``windows`` and return their results in the order given.

        Windows are batched longest first so that padding stays small. ``progress`` is
        called after each batch with the number of tokens it scored.
        """
        results: list[TokenScores | None] = [None] * len(windows)
        for batch_indices in self.batches(windows):
            batch = [windows[i] for i in batch_indices]
            for index, scores in zip(batch_indices, self._score_batch(batch), strict=True):
                results[index] = scores
            if progress is not None:
                progress(sum(window.num_scored for window in batch))
        return results

    def batches(self, windows: Sequence[Window]) -> Iterator[list[int]]:
        """Yield the window indices of each batch, longest windows first.

        When two or more windows have the longest length, they get batches of their
        own: a batch without padding needs no attention mask, so SDPA runs its causal
        kernel, which skips the masked half of the scores (about 1.7x faster attention
        on a 2-core CPU at 2048 tokens). The shorter windows are padded together.
        """
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
        longest = len(windows[order[0]].input_ids) if order else 0
        num_longest = sum(len(windows[i].input_ids) == longest for i in order)
        groups = [order[:num_longest], order[num_longest:]] if num_longest > 1 else [order]
        for group in groups:
            for begin in range(0, len(group), self.batch_size):
                yield group[begin : begin + self.batch_size]

    def logit_chunks(self, batch: Sequence[Window]) -> Iterator[LogitChunk]:
        """Run one batch and yield float32 logits of its scored positions, C at a time.

        Positions come window by window in target order, so two scorers with the same
        ``chunk_size`` yield aligned chunks for the same batch.
        """
        input_ids, attention_mask, position_ids, offsets = self._pad(batch)
        rows, cols, targets = _scored_coordinates(batch, offsets)
        # dtype long: an empty list (a batch that scores nothing) would become float.
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        cols_t = torch.tensor(cols, dtype=torch.long, device=self.device)
        targets_t = torch.tensor(targets, dtype=torch.long, device=self.device)
        if self.split_head:
            hidden = self._decoder(input_ids, attention_mask, position_ids)  # [B, T, H]
            # The last layer may sit on another device than the inputs (--device-map).
            selected = hidden[rows_t.to(hidden.device), cols_t.to(hidden.device)]  # [N, H]
            to_logits = self._head
        else:
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).logits  # [B, T, V]
            selected = logits[rows_t.to(logits.device), cols_t.to(logits.device)]  # [N, V]
            to_logits = _identity
        for begin in range(0, len(targets), self.chunk_size):
            end = min(begin + self.chunk_size, len(targets))
            chunk_logits = to_logits(selected[begin:end]).float()  # [C, V]
            yield LogitChunk(
                logits=chunk_logits,
                targets=targets_t[begin:end].to(chunk_logits.device),
                begin=begin,
                end=end,
            )

    def locate(self, batch: Sequence[Window], position: int) -> tuple[int, int]:
        """Return (document, token index) of the batch's ``position``-th scored target."""
        for window in batch:
            if position < window.num_scored:
                return window.document, window.first_target + position
            position -= window.num_scored
        raise IndexError(position)

    def _score_batch(self, batch: Sequence[Window]) -> list[TokenScores]:
        num_scored = sum(window.num_scored for window in batch)
        columns = {
            "token_nll": np.empty(num_scored, dtype=np.float64),
            "correct": np.empty(num_scored, dtype=bool),
            "top1_prob": np.empty(num_scored, dtype=np.float32),
        }
        if self.with_entropy:
            columns["entropy"] = np.empty(num_scored, dtype=np.float32)
        for chunk in self.logit_chunks(batch):
            rows = slice(chunk.begin, chunk.end)
            for name, values in _chunk_statistics(chunk, self.with_entropy).items():
                columns[name][rows] = values
        self._check_finite(columns["token_nll"], batch)
        return _split_by_window(batch, columns)

    def _pad(self, batch: Sequence[Window]):
        """Pad a batch to ``[B, T]`` and return ids, mask, position ids and offsets."""
        length = max(len(window.input_ids) for window in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        offsets = []
        for row, window in enumerate(batch):
            size = len(window.input_ids)
            offset = length - size if self.padding_side == "left" else 0
            input_ids[row, offset : offset + size] = torch.tensor(window.input_ids)
            attention_mask[row, offset : offset + size] = 1
            offsets.append(offset)
        # Positions count real tokens only, so left padding does not shift them.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return (
            input_ids.to(self.device),
            attention_mask.to(self.device),
            position_ids.to(self.device),
            offsets,
        )

    def _decoder(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        output = self.model.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return output.last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return _output_logits(self.model, hidden)

    def _check_finite(self, token_nll: np.ndarray, batch: Sequence[Window]) -> None:
        bad = np.flatnonzero(~np.isfinite(token_nll))
        if len(bad) == 0:
            return
        document, position = self.locate(batch, int(bad[0]))
        raise ScoringError(
            f"the model returned a non-finite log-probability ({token_nll[bad[0]]}) "
            f"in document {document} at token {position}; check the weights "
            f"and dtype (float16 overflows easily; try --dtype float32 or bfloat16)"
        )


def _chunk_statistics(chunk: LogitChunk, with_entropy: bool) -> dict[str, np.ndarray]:
    """Compute per-position NLL, top-1 correctness, confidence and maybe entropy."""
    logits = chunk.logits  # [C, V]
    log_normalizer = torch.logsumexp(logits, dim=-1)  # [C]
    target_logits = logits.gather(-1, chunk.targets[:, None]).squeeze(-1)
    top1_logits, top1_ids = logits.max(-1)
    statistics = {
        "token_nll": (log_normalizer - target_logits).double().cpu().numpy(),
        "correct": (top1_ids == chunk.targets).cpu().numpy(),
        "top1_prob": (top1_logits - log_normalizer).exp().cpu().numpy(),
    }
    if with_entropy:
        logprobs = logits - log_normalizer[:, None]  # [C, V]
        entropy = -(logprobs.exp() * logprobs).nan_to_num(0.0).sum(-1)
        statistics["entropy"] = entropy.cpu().numpy()
    return statistics


def _split_by_window(batch: Sequence[Window], columns: dict[str, np.ndarray]) -> list[TokenScores]:
    results = []
    begin = 0
    for window in batch:
        end = begin + window.num_scored
        results.append(TokenScores(**{name: values[begin:end] for name, values in columns.items()}))
        begin = end
    return results


def _scored_coordinates(batch: Sequence[Window], offsets: Sequence[int]):
    """Return the [B, T] coordinates and target ids of every scored position."""
    rows, cols, targets = [], [], []
    for row, (window, offset) in enumerate(zip(batch, offsets, strict=True)):
        positions = range(offset + window.score_start, offset + len(window.input_ids))
        rows.extend([row] * len(positions))
        cols.extend(positions)
        targets.extend(window.target_ids[window.score_start :])
    return rows, cols, targets


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the output layer (and final logit soft-capping, where the model has it)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def _head_matches_model(model: PreTrainedModel) -> bool:
    """Check on a short input that logits equal output layer(decoder(input)).

    The chunked path relies on this; a model that post-processes logits in another
    way is scored with full forward passes instead.
    """
    if model.get_output_embeddings() is None:
        return False
    device = next(model.parameters()).device
    vocab_size = model.get_output_embeddings().weight.shape[0]
    input_ids = torch.arange(8, device=device)[None] % vocab_size
    try:
        expected = model(input_ids=input_ids, use_cache=False).logits.float()
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    except (AttributeError, TypeError, NotImplementedError):
        return False
    actual = _output_logits(model, hidden).float()
    # equal_nan: a model with NaN weights still takes the chunked path, and scoring
    # then reports where the NaN appears.
    return torch.allclose(actual, expected, rtol=1e-4, atol=1e-4, equal_nan=True)


def prefix_token_id(tokenizer) -> int:
    """Return the token that conditions a document's first token: BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ScoringError(
        f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token, so "
        "the first token of a document has nothing to be predicted from; add one to "
        "the tokenizer (bos_token in tokenizer_config.json)"
    )


def auto_batch_size(model: PreTrainedModel, window_tokens: int) -> int:
    """Choose how many ``window_tokens``-long windows to score per forward pass.

    On CUDA: the largest batch that fits the free device memory. On a CPU: enough
    windows for :data:`CPU_BATCH_TOKENS` input tokens, at least one, and no more than
    the available system memory allows.

    NOTE: the memory limit is an estimate from activation sizes, not a trial run.
    """
    config = model.config
    hidden = getattr(config, "hidden_size", 1024)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    heads = getattr(config, "num_attention_heads", 16)
    element = torch.finfo(model.dtype).bits // 8
    # Live activations of one layer per token, plus the attention scores [heads, T, T].
    per_window = window_tokens * (8 * hidden + 3 * intermediate) * element
    per_window += heads * window_tokens**2 * 4
    device = next(model.parameters()).device
    budget = _free_memory(device) // 4
    largest = MAX_AUTO_BATCH_SIZE
    if device.type == "cpu":
        largest = min(largest, max(1, CPU_BATCH_TOKENS // window_tokens))
    return int(max(1, min(largest, budget // max(per_window, 1))))


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
