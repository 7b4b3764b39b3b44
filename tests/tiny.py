"""Tiny real models and tokenizers built in code, for fast offline tests.

Every builder is deterministic: the same arguments give the same weights and
the same token ids on any machine.
"""

from __future__ import annotations

import string
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# The vocabulary of the GGUF file written by `write_tiny_gguf`, in id order: a
# sentencepiece-style character vocabulary, so "ab c" encodes as ▁ a b ▁ c.
GGUF_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, "\u2581", *string.ascii_lowercase]
GGUF_VOCAB_SIZE = len(GGUF_TOKENS)

# Token types as llama.cpp numbers them in `tokenizer.ggml.token_type`.
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3


def make_tokenizer(
    words: list[str],
    bos: bool = True,
    eos: bool = True,
    pad: str | None = None,
    *,
    add_bos_token: bool = False,
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer that splits on whitespace.

    Ids are assigned in order: ``<unk>``, ``<s>`` (if ``bos``), ``</s>`` (if
    ``eos``), ``pad`` (if given), then ``words``. A word not in the vocabulary
    encodes as ``<unk>``. With ``add_bos_token`` the tokenizer prepends ``<s>``
    when encoding with special tokens, as Gemma's does; without it encoding adds
    nothing, as SmolLM2's does.
    """
    specials = [UNK_TOKEN]
    if bos:
        specials.append(BOS_TOKEN)
    if eos:
        specials.append(EOS_TOKEN)
    if pad is not None:
        specials.append(pad)
    vocab = {token: index for index, token in enumerate([*specials, *words])}
    if len(vocab) != len(specials) + len(words):
        raise ValueError(f"words must be unique and not special tokens, got {words!r}")

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos_token:
        if not bos:
            raise ValueError("add_bos_token=True needs bos=True")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN if bos else None,
        eos_token=EOS_TOKEN if eos else None,
        pad_token=pad,
    )


def make_tiny_llama(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build a randomly initialised Llama model in eval mode, float32, on CPU."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        # Wider than the default 0.02, so the next-token distributions are far
        # from uniform and a wrong weight changes the logits visibly.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()


def save_model_dir(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Save ``model`` (as safetensors) and ``tokenizer`` into the directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_gguf(path: Path, model: LlamaForCausalLM) -> Path:
    """Write ``model`` as a float32 GGUF file with the `GGUF_TOKENS` vocabulary.

    transformers loads the file back into a model with the same weights as
    ``model``, so both give the same logits.
    """
    config = model.config
    if config.vocab_size != GGUF_VOCAB_SIZE:
        raise ValueError(
            f"model vocab_size must be {GGUF_VOCAB_SIZE} to match GGUF_TOKENS, "
            f"got {config.vocab_size}"
        )
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_llama_metadata(writer, config)
    _add_tokenizer_metadata(writer)
    for name, tensor in _gguf_tensors(model):
        writer.add_tensor(name, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_gguf_header_only(path: Path, architecture: str) -> Path:
    """Write a GGUF file with no tensors that declares ``architecture``."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _add_llama_metadata(writer: gguf.GGUFWriter, config: LlamaConfig) -> None:
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter) -> None:
    token_types = [_UNKNOWN, _CONTROL, _CONTROL] + [_NORMAL] * (GGUF_VOCAB_SIZE - 3)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_scores([0.0] * GGUF_VOCAB_SIZE)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(GGUF_TOKENS.index(UNK_TOKEN))
    writer.add_bos_token_id(GGUF_TOKENS.index(BOS_TOKEN))
    writer.add_eos_token_id(GGUF_TOKENS.index(EOS_TOKEN))
    writer.add_add_bos_token(True)


def _gguf_tensors(model: LlamaForCausalLM) -> list[tuple[str, np.ndarray]]:
    """Return the model's weights under llama.cpp's tensor names.

    llama.cpp stores the query and key projections with the rows of each head
    reordered from [first half, second half] to interleaved pairs, and
    transformers undoes that on loading, so the same reordering is applied here.
    """
    config = model.config
    weights = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    tensors = [
        ("token_embd.weight", weights["model.embed_tokens.weight"]),
        ("output_norm.weight", weights["model.norm.weight"]),
        ("output.weight", weights["lm_head.weight"]),
    ]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        query = weights[f"{prefix}.self_attn.q_proj.weight"]
        key = weights[f"{prefix}.self_attn.k_proj.weight"]
        tensors += [
            (f"blk.{layer}.attn_norm.weight", weights[f"{prefix}.input_layernorm.weight"]),
            (
                f"blk.{layer}.attn_q.weight",
                _interleave_rope_halves(query, config.num_attention_heads),
            ),
            (
                f"blk.{layer}.attn_k.weight",
                _interleave_rope_halves(key, config.num_key_value_heads),
            ),
            (f"blk.{layer}.attn_v.weight", weights[f"{prefix}.self_attn.v_proj.weight"]),
            (f"blk.{layer}.attn_output.weight", weights[f"{prefix}.self_attn.o_proj.weight"]),
            (f"blk.{layer}.ffn_norm.weight", weights[f"{prefix}.post_attention_layernorm.weight"]),
            (f"blk.{layer}.ffn_gate.weight", weights[f"{prefix}.mlp.gate_proj.weight"]),
            (f"blk.{layer}.ffn_up.weight", weights[f"{prefix}.mlp.up_proj.weight"]),
            (f"blk.{layer}.ffn_down.weight", weights[f"{prefix}.mlp.down_proj.weight"]),
        ]
    return tensors


def _interleave_rope_halves(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # Per head, rows [h0 .. h(d/2-1), g0 .. g(d/2-1)] become [h0, g0, h1, g1, ...].
    rows, columns = weight.shape
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, 2, head_dim // 2, columns)
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(rows, columns))
