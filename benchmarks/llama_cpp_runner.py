"""Score documents with llama.cpp through llama-cpp-python, in rolling windows.

llama.cpp runs the original GGUF file (SmolLM2 in Q4_1, Gemma 3 in Q4_K_M), so its
weights are quantized and its perplexity differs slightly from that of the
dequantized float32 model the other tools load. It reads the JSON Lines file that
``benchmarks/run.py`` writes (one detokenized article per line, field "text") and
cuts each article as lmeval's rolling protocol does: disjoint windows of
``--window-size`` predicted tokens, the first conditioned on BOS, each later one on
the tokens before it, up to ``--window-size`` inputs.

    python benchmarks/llama_cpp_runner.py --gguf FILE --data docs.jsonl \
        --window-size 2048 --output llama.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib.metadata import version

import numpy as np
from llama_cpp import Llama

# Positions whose log-softmax is computed at once: bounds the float64 copy in memory.
ROWS_PER_CHUNK = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="GGUF model file")
    parser.add_argument("--data", required=True, help="JSON Lines file with a 'text' field")
    parser.add_argument("--window-size", type=int, required=True, help="tokens per window")
    parser.add_argument("--threads", type=int, help="CPU threads (default: available cores)")
    parser.add_argument("--batch-tokens", type=int, default=512, help="llama.cpp n_batch")
    parser.add_argument("--output", required=True, help="JSON file for the result")
    return parser.parse_args(argv)


def target_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Return the summed NLL of ``targets`` ``[N]`` under ``logits`` ``[N, V]``."""
    total = 0.0
    for begin in range(0, len(targets), ROWS_PER_CHUNK):
        rows = logits[begin : begin + ROWS_PER_CHUNK].astype(np.float64)  # [C, V]
        peak = rows.max(axis=1, keepdims=True)
        log_normalizer = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]  # [C]
        chosen = rows[np.arange(len(rows)), targets[begin : begin + ROWS_PER_CHUNK]]
        total += float((log_normalizer - chosen).sum())
    return total


def document_nll(llm: Llama, tokens: list[int], window_size: int) -> float:
    """Return the summed NLL of every token of one document, in rolling windows."""
    sequence = [llm.token_bos(), *tokens]
    sum_nll = 0.0
    scored = 0
    while scored < len(tokens):
        end = min(len(tokens), scored + window_size)
        start = max(0, end - window_size)
        inputs = sequence[start:end]  # predicts tokens[start:end]
        llm.reset()
        llm.eval(inputs)
        logits = np.asarray(llm.scores[: len(inputs)])  # [T, V] float32
        first = scored - start  # inputs before it only give context
        sum_nll += target_nll(logits[first:], np.asarray(tokens[scored:end]))
        scored = end
    return sum_nll


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))

    load_started = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.window_size,
        n_batch=min(args.batch_tokens, args.window_size),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    load_seconds = time.perf_counter() - load_started

    with open(args.data, encoding="utf-8") as file:
        texts = [json.loads(line)["text"] for line in file]
    scoring_started = time.perf_counter()
    sum_nll = 0.0
    num_tokens = 0
    for text in texts:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if not tokens:
            continue
        sum_nll += document_nll(llm, tokens, args.window_size)
        num_tokens += len(tokens)
    scoring_seconds = time.perf_counter() - scoring_started

    result = {
        "tool": "llama.cpp",
        "perplexity": math.exp(sum_nll / num_tokens),
        "num_tokens": num_tokens,
        "num_documents": len(texts),
        "window_size": args.window_size,
        "batch_tokens": min(args.batch_tokens, args.window_size),
        "dtype": "gguf",
        "threads": threads,
        "load_seconds": load_seconds,
        "scoring_seconds": scoring_seconds,
        "tokens_per_second": num_tokens / scoring_seconds,
        "versions": {"llama-cpp-python": version("llama-cpp-python")},
    }
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
