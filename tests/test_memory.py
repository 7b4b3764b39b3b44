"""Peak memory of scoring must not grow with window x vocabulary.

Full float32 logits of a window take ``T x V x 4`` bytes (4 GiB for Gemma 3 at 4096
tokens), so scoring passes only ``C`` positions at a time through the output layer.
These tests score a tiny model with a 65,536-token vocabulary at two window sizes
in a fresh subprocess, and compare how much its resident memory (VmHWM, reset just
before each scoring) and its numpy allocations (tracemalloc) grow. Nothing is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmeval.scoring import CHUNK_BYTES, default_chunk_size

VOCAB_SIZE = 65_536
CHUNK_SIZE = 64
SMALL_WINDOW = 128
LARGE_WINDOW = 2048
# Bytes that full logits of the large window add over the small one: 480 MiB.
FULL_LOGITS_GROWTH = (LARGE_WINDOW - SMALL_WINDOW) * VOCAB_SIZE * 4

# Builds the model, scores a warm-up window, then for each window size in argv[3:]
# resets the peak RSS, scores one window of that size with chunks of argv[2]
# positions, and prints the growth. The large window goes first: memory it leaves
# with the allocator can only shrink the small window's growth, which makes the
# comparison stricter, never looser.
CHILD = """
import json, sys, tracemalloc
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from lmeval.scoring import WindowScorer
from lmeval.windows import rolling_windows

def status_bytes(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

vocab_size, chunk_size, *window_sizes = map(int, sys.argv[1:])
torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(
    vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
model = LlamaForCausalLM(config).eval()
scorer = WindowScorer(model, chunk_size=chunk_size)
tokens = torch.randint(3, vocab_size, (max(window_sizes),)).tolist()
scorer.score(rolling_windows(tokens[:16], 1, 16))  # warm-up: lazy allocations

growth = {}
for window_size in window_sizes:
    windows = rolling_windows(tokens[:window_size], 1, window_size)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM to the current RSS
    before = status_bytes("VmRSS")
    tracemalloc.start()
    scores = scorer.score(windows)
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    growth[window_size] = {
        "rss_growth": status_bytes("VmHWM") - before,
        "numpy_peak": numpy_peak,
        "num_scored": int(sum(len(s.token_nll) for s in scores)),
    }
print(json.dumps(growth))
"""


def scoring_growth(chunk_size: int, window_sizes: list[int]) -> dict[int, dict]:
    """Run the child and return its memory growth in bytes for each window size."""
    # glibc serves allocations above the mmap threshold with their own mappings and
    # unmaps them on free. A fixed threshold turns off its adaptive one, which
    # otherwise moves freed chunks into the heap, where fragmentation keeps them
    # resident and RSS then counts memory that scoring no longer holds.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(VOCAB_SIZE), str(chunk_size), *map(str, window_sizes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    growth = json.loads(completed.stdout.splitlines()[-1])
    return {int(window): values for window, values in growth.items()}


@pytest.fixture(scope="module")
def growth() -> dict[int, dict]:
    return scoring_growth(CHUNK_SIZE, [LARGE_WINDOW, SMALL_WINDOW])


def test_every_target_scored(growth):
    assert growth[SMALL_WINDOW]["num_scored"] == SMALL_WINDOW
    assert growth[LARGE_WINDOW]["num_scored"] == LARGE_WINDOW


def test_rss_not_growing_with_window_times_vocab(growth):
    extra = growth[LARGE_WINDOW]["rss_growth"] - growth[SMALL_WINDOW]["rss_growth"]
    # Activations of the tiny model and chunk temporaries grow by a few MiB here.
    # Full logits would add FULL_LOGITS_GROWTH, so even a quarter of it fails.
    assert extra < FULL_LOGITS_GROWTH / 4, (
        f"peak RSS grew {extra / 2**20:.0f} MiB from window {SMALL_WINDOW} to "
        f"{LARGE_WINDOW}; full logits would add {FULL_LOGITS_GROWTH / 2**20:.0f} MiB"
    )


def test_rss_growth_bounded_by_chunks(growth):
    # A few [C, V] float32 temporaries per chunk (logits, exp, logsumexp) plus the
    # model's activations, with 32 MiB to spare for allocator rounding.
    chunk_bytes = CHUNK_SIZE * VOCAB_SIZE * 4
    bound = 4 * chunk_bytes + 32 * 2**20
    assert growth[LARGE_WINDOW]["rss_growth"] < bound


def test_numpy_peak_per_token_only(growth):
    # The numpy results hold a few values per scored token, never a vocabulary row.
    assert growth[LARGE_WINDOW]["numpy_peak"] < LARGE_WINDOW * 64 + 2**20


def test_default_chunk_fits_chunk_bytes():
    for vocab_size in (49_152, 65_536, 262_144):
        chunk_size = default_chunk_size(vocab_size)
        assert chunk_size * vocab_size * 4 <= CHUNK_BYTES
        assert chunk_size >= 1
