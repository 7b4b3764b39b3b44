"""Measure this machine's dense matmul rate with torch, in FLOP per second.

Multiplies two random ``[N, N]`` matrices repeatedly for about ``--seconds`` and
prints a JSON object with the median rate over the repeats. One matmul counts
``2 N^3`` floating-point operations. It multiplies in the layout of a linear layer,
``x @ W^T`` (``torch.nn.functional.linear``): in torch 2.13 on a CPU without
AVX-512 BF16, a bfloat16 ``torch.mm`` with an untransposed right operand measured
about 6x slower than that layout. The benchmark compares the model's achieved
rate against this one.

    python benchmarks/matmul_probe.py --size 2048 --dtype float32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.nn.functional import linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure(size: int, dtype: torch.dtype, seconds: float) -> dict:
    """Time repeated ``[size, size]`` matmuls and return the rates and the repeat count."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(size, size, generator=generator).to(dtype)
    weight = torch.randn(size, size, generator=generator).to(dtype)
    linear(inputs, weight)  # warm-up: thread pool and kernel selection
    rates = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(rates) < 3:
        begin = time.perf_counter()
        linear(inputs, weight)
        rates.append(2 * size**3 / (time.perf_counter() - begin))
    return {
        "flops_per_second": statistics.median(rates),
        "max_flops_per_second": max(rates),
        "repeats": len(rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="matrix side N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads (default: available cores)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time to spend measuring")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    result = measure(args.size, DTYPES[args.dtype], args.seconds)
    result |= {"size": args.size, "dtype": args.dtype, "threads": threads}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
