"""Real Llama models whose next-token distributions are set by hand.

The weights are chosen so that the logits at position t depend only on the token at t:
every attention and MLP block is switched off (its output projection is zero), the
embedding of token i is ``e_i``, which the final RMSNorm turns into ``sqrt(V) * e_i``,
and the output layer is the transposed table divided by ``sqrt(V)``. The model is then
a bigram model whose ``log_softmax`` is the given table of log-probabilities, and any
sequence's NLL is known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def bigram_llama(logprobs: np.ndarray, max_positions: int = 512) -> LlamaForCausalLM:
    """Build a model with ``log p(next = j | current = i) = logprobs[i, j]``.

    Args:
        logprobs: ``[V, V]`` table; each row is normalised with log-softmax.
    """
    table = torch.log_softmax(torch.as_tensor(logprobs, dtype=torch.float64), dim=-1)
    vocab_size = table.shape[0]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=vocab_size,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=2,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-30,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size))
        model.lm_head.weight.copy_((table.T / math.sqrt(vocab_size)).float())
    return model.requires_grad_(False)


def cycle_table(vocab_size: int, p: float) -> np.ndarray:
    """Return log-probabilities that put ``p`` on ``(i + 1) % V`` after token ``i``.

    The remaining ``1 - p`` is spread evenly over the other ``V - 1`` tokens.
    """
    table = np.full((vocab_size, vocab_size), (1 - p) / (vocab_size - 1))
    for i in range(vocab_size):
        table[i, (i + 1) % vocab_size] = p
    return np.log(table)


def uniform_llama(vocab_size: int, max_positions: int = 512) -> LlamaForCausalLM:
    """Build a model whose every next-token distribution is uniform over V tokens."""
    return bigram_llama(np.zeros((vocab_size, vocab_size)), max_positions)


def random_table(vocab_size: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    """Return a ``[V, V]`` table of log-probabilities drawn at random, rows normalised.

    Unlike :func:`cycle_table`, almost every (previous, next) pair has its own
    probability, so reading a token's NLL from the wrong pair changes the number.
    """
    logits = np.random.default_rng(seed).normal(scale=scale, size=(vocab_size, vocab_size))
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def bigram_nll(table: np.ndarray, tokens: list[int], prefix: int) -> np.ndarray:
    """Return the closed-form NLL of each of ``tokens`` after ``prefix`` under ``table``.

    Token ``j`` is predicted from token ``j - 1``, the first one from ``prefix``.
    """
    previous = [prefix, *tokens[:-1]]
    return -table[previous, tokens]
