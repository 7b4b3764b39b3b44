"""Score documents with the plain strided loop of the transformers perplexity guide.

This is the naive baseline of the benchmark: one window at a time, batch size 1, and
``model(input_ids, labels=labels)``, which materialises float32 logits for every
position of the window ``[1, T, V]`` before the loss. It reads the JSON Lines file
that ``benchmarks/run.py`` writes (one detokenized article per line, field "text"),
so it scores exactly the text lmeval scores.

Each document is prefixed with the tokenizer's BOS token (EOS if it has none), as
lmeval and lm-evaluation-harness do, so that its first token is scored too. Windows
hold ``--window-size`` input tokens. With the default stride of window - 1, each
window starts with the last input token of the previous one, so every token after
the prefix is predicted exactly once.

    python benchmarks/naive_loop.py --model-dir DIR --data docs.jsonl \
        --window-size 2048 --output naive.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib.metadata import version

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--data", required=True, help="JSON Lines file with a 'text' field")
    parser.add_argument("--window-size", type=int, required=True, help="input tokens per window")
    parser.add_argument("--stride", type=int, help="tokens between window starts (window - 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads (default: available cores)")
    parser.add_argument("--output", required=True, help="JSON file for the result")
    return parser.parse_args(argv)


def document_nll(model, ids: torch.Tensor, window_size: int, stride: int) -> tuple[float, int]:
    """Return the summed NLL (nats) and count of the tokens ``ids[1:]``, window by window.

    ``ids`` is ``[1, L]`` with the prefix token first. A window's positions whose
    targets an earlier window already predicted get label -100, so each target
    counts once.
    """
    length = ids.shape[1]
    sum_nll = 0.0
    num_predicted = 0
    predicted_until = 1  # ids[:predicted_until] need no more predictions
    for begin in range(0, length - 1, stride):
        end = min(begin + window_size, length)
        input_ids = ids[:, begin:end]  # [1, T]
        labels = input_ids.clone()
        # labels[j] is predicted from position j - 1; skip targets already scored.
        labels[:, : max(predicted_until - begin, 1)] = -100
        new_targets = end - max(predicted_until, begin + 1)
        if new_targets > 0:
            loss = model(input_ids=input_ids, labels=labels).loss  # mean over new targets
            sum_nll += loss.item() * new_targets
            num_predicted += new_targets
            predicted_until = end
        if end == length:
            break
    return sum_nll, num_predicted


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    stride = args.stride or args.window_size - 1

    load_started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=DTYPES[args.dtype])
    model.eval()
    load_seconds = time.perf_counter() - load_started
    prefix = tokenizer.bos_token_id
    if prefix is None:
        prefix = tokenizer.eos_token_id

    with open(args.data, encoding="utf-8") as file:
        texts = [json.loads(line)["text"] for line in file]
    scoring_started = time.perf_counter()
    sum_nll = 0.0
    num_tokens = 0
    with torch.no_grad():
        for text in texts:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not tokens:
                continue
            ids = torch.tensor([[prefix, *tokens]])
            document_sum, document_count = document_nll(model, ids, args.window_size, stride)
            sum_nll += document_sum
            num_tokens += document_count
    scoring_seconds = time.perf_counter() - scoring_started

    result = {
        "tool": "naive",
        "perplexity": math.exp(sum_nll / num_tokens),
        "num_tokens": num_tokens,
        "num_documents": len(texts),
        "window_size": args.window_size,
        "stride": stride,
        "batch_size": 1,
        "dtype": args.dtype,
        "threads": threads,
        "load_seconds": load_seconds,
        "scoring_seconds": scoring_seconds,
        "tokens_per_second": num_tokens / scoring_seconds,
        "versions": {name: version(name) for name in ("torch", "transformers")},
    }
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
