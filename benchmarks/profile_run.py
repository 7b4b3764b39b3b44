"""Profile one ``lmeval ppl`` run with py-spy and print where its time goes.

Runs ``py-spy record`` (from the peers' environment, ``benchmarks/setup.sh``) on

    lmeval ppl --model MODEL --task wikitext2 --data-files DATA --window-size W
        --limit N --dtype DTYPE --threads T --batch-size auto --no-progress

and prints a Markdown table of the share of samples spent in each part of the run,
counting a sample for a part when the part's function is anywhere on the stack
(inclusive time). The raw collapsed stacks are kept beside the table, in
``benchmarks/work/profile-<dtype>.txt``.

    .venv/bin/python benchmarks/profile_run.py --dtype float32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PY_SPY = BENCH_DIR / ".venv-peers" / "bin" / "py-spy"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Part of the run -> substrings of a py-spy frame ("function (file:line)") that mark it.
# The decoder's parts are matched inside the decoder's samples only.
PARTS = {
    "model load": ("load_model (lmeval/models.py",),
    "data and tokenization": ("load_corpus (lmeval/data.py", "build_units (lmeval/"),
    "decoder forward pass": ("_decoder (lmeval/scoring.py",),
    "output layer on scored positions": ("_head (lmeval/scoring.py",),
    "log-softmax statistics (logsumexp, gather, max)": ("_chunk_statistics (lmeval/scoring.py",),
}
DECODER_PARTS = {
    "attention (scaled_dot_product_attention)": ("sdpa_attention_forward",),
    "linear layers (matmuls)": ("forward (torch/nn/modules/linear.py",),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--window-size", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=2, help="WikiText-2 test articles")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="wiki.test.raw path")
    return parser.parse_args()


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    """Read py-spy's collapsed stacks: ``frame;frame;... count`` per line."""
    stacks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        frames, _, count = line.rpartition(" ")
        if frames:
            stacks.append((frames.split(";"), int(count)))
    return stacks


def share(stacks: list[tuple[list[str], int]], markers: tuple[str, ...]) -> int:
    """Count the samples whose stack has a frame containing one of ``markers``."""
    return sum(
        count
        for frames, count in stacks
        if any(marker in frame for frame in frames for marker in markers)
    )


def main() -> None:
    args = parse_args()
    output = BENCH_DIR / "work" / f"profile-{args.dtype}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lmeval", "ppl", "--model", args.model]
    command += ["--task", "wikitext2", "--data-files", str(args.data)]
    command += ["--window-size", str(args.window_size), "--limit", str(args.limit)]
    command += ["--dtype", args.dtype, "--threads", str(args.threads)]
    command += ["--batch-size", "auto", "--no-progress", "-q"]
    record = [str(PY_SPY), "record", "--format", "raw", "--rate", str(args.rate)]
    record += ["--output", str(output), "--"]
    subprocess.run(record + command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)

    stacks = read_stacks(output)
    total = sum(count for _, count in stacks)
    decoder_stacks = [
        (f, c) for f, c in stacks if any(PARTS["decoder forward pass"][0] in x for x in f)
    ]
    print(f"py-spy {args.rate} Hz, {total} samples: `{' '.join(command[1:])}`\n")
    print("| part | share of samples |")
    print("|---|---|")
    for name, markers in PARTS.items():
        print(f"| {name} | {share(stacks, markers) / total:.1%} |")
        if name == "decoder forward pass":
            for inner, inner_markers in DECODER_PARTS.items():
                print(
                    f"| … of which {inner} | {share(decoder_stacks, inner_markers) / total:.1%} |"
                )


if __name__ == "__main__":
    main()
