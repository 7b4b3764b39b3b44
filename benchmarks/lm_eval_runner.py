"""Run lm-evaluation-harness on the local WikiText task and time its scoring.

This does what the command

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32,max_length=W \
        --tasks wikitext_local --include_path benchmarks/lm_eval_tasks --batch_size B

does, through lm-eval's Python API, so that the time spent in the model's
``loglikelihood_rolling`` (the scoring) is measured apart from the model load.
lm-eval reports word and byte perplexity only. The token perplexity is computed
here from the log-likelihoods it returns and the token count of its own tokenizer,
which is the definition lmeval uses. Run it from the repository root, because the task
YAML names its data file relative to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib.metadata import version

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--window-size", type=int, required=True, help="lm-eval max_length")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads (default: available cores)")
    parser.add_argument("--output", required=True, help="JSON file for the result")
    return parser.parse_args(argv)


class RollingTimer:
    """Wrap ``lm.loglikelihood_rolling`` to time it and keep its inputs and outputs."""

    def __init__(self, lm: HFLM) -> None:
        self.lm = lm
        self.inner = lm.loglikelihood_rolling
        self.seconds = 0.0
        self.texts: list[str] = []
        self.loglikelihoods: list[float] = []

    def __call__(self, requests, *args, **kwargs):
        started = time.perf_counter()
        outputs = self.inner(requests, *args, **kwargs)
        self.seconds += time.perf_counter() - started
        self.texts.extend(request.args[0] for request in requests)
        self.loglikelihoods.extend(float(value) for value in outputs)
        return outputs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    load_started = time.perf_counter()
    lm = HFLM(
        pretrained=args.model_dir,
        dtype=args.dtype,
        max_length=args.window_size,
        batch_size=args.batch_size,
        device="cpu",
    )
    load_seconds = time.perf_counter() - load_started
    timer = RollingTimer(lm)
    lm.loglikelihood_rolling = timer

    evaluate_started = time.perf_counter()
    output = simple_evaluate(
        model=lm,
        tasks=["wikitext_local"],
        task_manager=TaskManager(include_path=TASKS_DIR),
        log_samples=False,
        bootstrap_iters=0,
    )
    evaluate_seconds = time.perf_counter() - evaluate_started
    metrics = output["results"]["wikitext_local"]

    num_tokens = sum(len(lm.tok_encode(text)) for text in timer.texts)
    sum_nll = -sum(timer.loglikelihoods)
    result = {
        "tool": "lm-eval",
        "perplexity": math.exp(sum_nll / num_tokens),
        "num_tokens": num_tokens,
        "num_documents": len(timer.texts),
        "word_perplexity": metrics["word_perplexity,none"],
        "byte_perplexity": metrics["byte_perplexity,none"],
        "window_size": args.window_size,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "threads": threads,
        "load_seconds": load_seconds,
        "evaluate_seconds": evaluate_seconds,
        "scoring_seconds": timer.seconds,
        "tokens_per_second": num_tokens / timer.seconds,
        "versions": {name: version(name) for name in ("lm_eval", "torch", "transformers")},
    }
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
