"""Count the floating-point operations of scoring a corpus in rolling windows.

The count is of useful work, forward pass only, with a multiply-add as two FLOPs:

- every input position of a window runs the decoder: 2 x non-embedding parameters
  (the projection and MLP matmuls; norms are elementwise and counted as if they
  were matmul weights, a difference below 0.1% for these models);
- every input position at index j attends to j + 1 keys (fewer in a sliding-window
  layer): 4 x heads x head_dim FLOPs per key and layer, for QK^T and for AV;
- every scored position goes through the output layer: 2 x hidden x vocabulary.

Padding, masked-out attention scores and the log-softmax are not counted, so a tool
that computes them does more work than this count credits it with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a model's config.json and parameter count."""

    num_parameters: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    tied_embeddings: bool
    # Keys each layer attends to at most; None for full (causal) attention.
    layer_windows: tuple[int | None, ...]

    @property
    def non_embedding_parameters(self) -> int:
        embedding = self.vocab_size * self.hidden_size
        output_layer = 0 if self.tied_embeddings else embedding
        return self.num_parameters - embedding - output_layer


def model_shape(config: dict, num_parameters: int) -> ModelShape:
    """Build the shape from a Hugging Face ``config.json`` object.

    ``layer_types`` entries of "sliding_attention" (Gemma 3) attend to at most
    ``sliding_window`` keys; every other layer attends to all earlier positions.
    """
    config = config.get("text_config", config)
    num_layers = config["num_hidden_layers"]
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    layer_types = config.get("layer_types") or ["full_attention"] * num_layers
    sliding_window = config.get("sliding_window")
    windows = tuple(sliding_window if kind == "sliding_attention" else None for kind in layer_types)
    return ModelShape(
        num_parameters=num_parameters,
        hidden_size=config["hidden_size"],
        vocab_size=config["vocab_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        layer_windows=windows,
    )


def rolling_window_lengths(num_tokens: int, window_size: int) -> list[tuple[int, int]]:
    """Return (inputs, scored) per window of lmeval's rolling protocol for one document.

    The windows predict disjoint runs of ``window_size`` tokens; the last one takes
    already-scored tokens as context, up to ``window_size`` inputs.
    """
    windows = []
    scored = 0
    while scored < num_tokens:
        end = min(num_tokens, scored + window_size)
        start = max(0, end - window_size)
        windows.append((end - start, end - scored))
        scored = end
    return windows


def attention_keys(inputs: int, layer_window: int | None) -> int:
    """Return the keys summed over positions 0 .. inputs - 1 of one causal layer."""
    if layer_window is None or layer_window >= inputs:
        return inputs * (inputs + 1) // 2
    # Positions below the window see j + 1 keys, the rest exactly layer_window.
    ramp = layer_window * (layer_window + 1) // 2
    return ramp + (inputs - layer_window) * layer_window


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of scoring a corpus, split by where they are spent."""

    scored_tokens: int
    input_positions: int
    decoder_matmul: int
    attention: int
    output_layer: int

    @property
    def total(self) -> int:
        return self.decoder_matmul + self.attention + self.output_layer

    @property
    def per_token(self) -> float:
        return self.total / self.scored_tokens

    def record(self) -> dict:
        return asdict(self) | {"total": self.total, "per_token": self.per_token}


def count_flops(shape: ModelShape, document_tokens: Sequence[int], window_size: int) -> FlopCount:
    """Count the FLOPs of scoring documents of the given token counts."""
    scored_tokens = 0
    input_positions = 0
    keys_per_layer = 0  # summed over windows and layers
    for num_tokens in document_tokens:
        for inputs, scored in rolling_window_lengths(num_tokens, window_size):
            scored_tokens += scored
            input_positions += inputs
            keys_per_layer += sum(attention_keys(inputs, w) for w in shape.layer_windows)
    return FlopCount(
        scored_tokens=scored_tokens,
        input_positions=input_positions,
        decoder_matmul=2 * shape.non_embedding_parameters * input_positions,
        attention=4 * shape.num_heads * shape.head_dim * keys_per_layer,
        output_layer=2 * shape.hidden_size * shape.vocab_size * scored_tokens,
    )
