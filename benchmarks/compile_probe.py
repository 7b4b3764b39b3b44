"""Measure what ``lmeval ppl --compile`` gains: the decoder eager against compiled.

Loads a built-in model as lmeval does and runs its decoder on one window of random
token ids, first eager and then compiled with :func:`lmeval.models.compile_decoder`.
It prints a JSON object with the seconds per forward pass of each (median of
``--repeats`` after a warm-up), the one-time compilation cost and the largest
difference between the two outputs. The full benchmark (``run.py``) times whole
runs, where compiling the first batch would dominate a short text, so this probe
measures the steady-state speed apart.

    python benchmarks/compile_probe.py --model smollm2-135m --dtype float32 --window-size 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lmeval.models import compile_decoder, load_model


def time_decoder(
    decoder, input_ids: torch.Tensor, repeats: int
) -> tuple[list[float], torch.Tensor]:
    """Return the seconds of each of ``repeats`` forward passes and the last output."""
    seconds = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            seconds.append(time.perf_counter() - started)
    return seconds, hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model lmeval can load")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--window-size", type=int, default=2048, help="tokens per window")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each")
    parser.add_argument("--threads", type=int, help="CPU threads (default: available cores)")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    loaded = load_model(args.model, dtype=args.dtype)
    decoder = loaded.model.get_decoder()
    generator = torch.Generator().manual_seed(0)
    vocab_size = loaded.model.config.vocab_size
    input_ids = torch.randint(0, vocab_size, (1, args.window_size), generator=generator)

    time_decoder(decoder, input_ids, 1)  # warm-up
    eager, eager_hidden = time_decoder(decoder, input_ids, args.repeats)
    compile_decoder(loaded.model)
    first, _ = time_decoder(decoder, input_ids, 1)  # compiles
    time_decoder(decoder, input_ids, 1)  # warm-up of the compiled graph
    compiled, compiled_hidden = time_decoder(decoder, input_ids, args.repeats)

    difference = (compiled_hidden.float() - eager_hidden.float()).abs().max().item()
    eager_median = statistics.median(eager)
    compiled_median = statistics.median(compiled)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "window_size": args.window_size,
        "threads": threads,
        "eager_seconds": eager_median,
        "compiled_seconds": compiled_median,
        "speedup": eager_median / compiled_median,
        "first_compiled_call_seconds": first[0],
        "max_abs_difference": difference,
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
