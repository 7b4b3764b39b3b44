"""The ``lmeval`` command line: parse options, call the library, print results.

Results go to stdout; progress, logs and errors go to stderr. An invalid input ends
the command with one line ``lmeval: error: ...`` and exit status 2 (a traceback
too with ``-v``). Errors that argparse itself finds (an unknown flag, a value of
the wrong type) print the usage and then ``lmeval ppl: error: ...``, also with
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence

from lmeval.checkpoints import expand_models, is_pattern
from lmeval.config import (
    DEVICE_MAPS,
    DTYPES,
    PADDING_SIDES,
    RunConfig,
    build_config,
    load_config_file,
    validate_config,
)
from lmeval.distributed import is_main_process
from lmeval.errors import ConfigError, LmevalError
from lmeval.windows import PROTOCOLS

logger = logging.getLogger("lmeval")

PPL_EXAMPLE = """\
examples:
  lmeval ppl --model smollm2-135m
  lmeval ppl --model smollm2-135m --task wikitext2 --data-files wiki.test.raw \\
      --window-size 8192 --output results/smollm2-wikitext2
  lmeval ppl --model path/to/model --data notes.jsonl --text-field body --json
  lmeval ppl --model 'run/checkpoint-*' --task wikitext2 --data-files wiki.test.raw \\
      --output results/run-checkpoints
  torchrun --nproc-per-node 2 -m lmeval ppl --model smollm2-135m --output results/r2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmeval",
        description="Evaluate causal language models: perplexity and KL divergence.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ppl = commands.add_parser(
        "ppl",
        help="score a model's perplexity on a task or dataset",
        description="Score every token of a corpus with a causal LM and report "
        "perplexity, bits per byte, word and byte perplexity and top-1 accuracy.",
        epilog=PPL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_ppl_arguments(ppl)
    ppl.set_defaults(handler=run_ppl)
    from lmeval.kl_cli import add_kl_commands

    add_kl_commands(commands)
    from lmeval.compare import add_compare_command
    from lmeval.report import add_report_command

    add_report_command(commands)
    add_compare_command(commands)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    group = parser.add_argument_group("model")
    if several:
        group.add_argument(
            "--model",
            nargs="+",
            help="built-in name (smollm2-135m, gemma3-270m), local model directory, GGUF "
            "file or hub id; several, or a quoted glob such as 'run/checkpoint-*', score "
            "each checkpoint in order of training step into --output DIR/NAME",
        )
    else:
        group.add_argument(
            "--model",
            help="built-in name (smollm2-135m, gemma3-270m), local model directory, "
            "GGUF file or hub id",
        )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weight dtype (default float32)",
    )
    group.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or auto (default cpu); under torchrun, cuda means the "
        "GPU of each rank's LOCAL_RANK",
    )
    group.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        help="spread the model's layers over the GPUs, then the CPU, with accelerate "
        "(for a model larger than one device); replaces --device",
    )
    group.add_argument(
        "--max-memory",
        nargs="+",
        metavar="DEVICE=SIZE",
        help="memory --device-map may use per device, e.g. cpu=8GiB 0=20GiB (GPU "
        "index or cuda:N; sizes in bytes or KB, MB, GB, KiB, MiB, GiB)",
    )
    group.add_argument("--revision", help="branch, tag or commit of a hub model")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow a hub model's own Python code to run (off by default)",
    )
    group.add_argument(
        "--cache-dir",
        help="where converted GGUF weights are kept (default ~/.cache/lmeval)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--task", help="task name from tasks/ or a task YAML file (default python-docs)"
    )
    group.add_argument(
        "--data", help="a text, JSON Lines, CSV or Parquet file, or a hub dataset name"
    )
    group.add_argument(
        "--data-files", nargs="+", help="local files for the task, e.g. wiki.test.raw"
    )
    group.add_argument("--text-field", help="column holding the text (default text)")
    group.add_argument("--dataset-config", help="configuration name of a hub dataset")
    group.add_argument("--split", help="split of a hub dataset (default test)")
    group.add_argument(
        "--sample-by",
        choices=("document", "paragraph", "line"),
        help="how a plain-text file is cut into documents (default document: the whole file)",
    )
    group.add_argument("--limit", type=int, help="score only the first N documents")


# lmeval.scoring.CHUNK_BYTES in MiB, written out so that --help imports no torch.
CHUNK_MIB = 64


def add_scoring_arguments(parser: argparse.ArgumentParser, chunk_mib: int = CHUNK_MIB) -> None:
    """Add the windowing and batching options; ``chunk_mib`` is the logits chunk default."""
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="how documents are cut into windows (default rolling; see README)",
    )
    group.add_argument(
        "--window-size",
        type=int,
        help="tokens per model input (default: the model's limit, at most 2048)",
    )
    group.add_argument(
        "--stride",
        type=int,
        help="tokens a sliding window advances (default half the window)",
    )
    group.add_argument(
        "--batch-size",
        type=_batch_size,
        help="windows per forward pass, or auto (default 1)",
    )
    group.add_argument(
        "--logits-chunk-size",
        type=int,
        help=f"positions whose logits are held at once (default: {chunk_mib} MiB of "
        "float32 logits per model)",
    )
    group.add_argument("--padding-side", choices=PADDING_SIDES, help="default right")
    group.add_argument("--threads", type=int, help="CPU threads (default: all available cores)")
    group.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="compile the decoder with torch.compile (the first batch pays for compiling)",
    )


def add_output_arguments(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output", help="directory for results.json and documents.jsonl")
    if resume:
        group.add_argument(
            "--resume",
            action="store_true",
            default=None,
            help="continue a killed run in --output without rescoring finished documents",
        )
    group.add_argument(
        "--json", action="store_true", default=None, help="print results.json to stdout"
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="hide the progress bar",
    )
    group.add_argument("--config", help="YAML file of options; command-line flags override it")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several=True)
    add_data_arguments(parser)
    add_scoring_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument(
        "--save-tokens",
        action="store_true",
        help="also write --output/tokens.parquet: one row per scored token with its NLL, "
        "top-1 correctness and probability, and entropy",
    )


def run_ppl(args: argparse.Namespace) -> int:
    # Options are checked before lmeval.run imports torch and transformers, which
    # takes several seconds, so that an invalid option fails at once.
    save_tokens = vars(args).pop("save_tokens", False)
    config = _config_from_args(args)
    if save_tokens and not config.output:
        raise ConfigError("--save-tokens needs --output DIR, the directory tokens.parquet goes to")
    if not config.progress:
        _disable_library_progress_bars()
    models = expand_models(config.model)
    if len(models) > 1 or any(is_pattern(spec) for spec in _as_list(config.model)):
        from lmeval.checkpoints import format_summary_table, run_checkpoints

        summary = run_checkpoints(
            dataclasses.replace(config, model=models),
            progress_bar=config.progress,
            save_tokens=save_tokens,
        )
        if is_main_process():
            _print_summary(summary, config.json, format_summary_table)
        return 0
    config = dataclasses.replace(config, model=models[0])
    from lmeval.run import run_perplexity

    results = run_perplexity(config, progress_bar=config.progress, save_tokens=save_tokens)
    if is_main_process():
        _print_results(results, config.json)
    return 0


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _print_summary(summary: dict, as_json: bool, format_table) -> None:
    if as_json:
        json.dump(summary, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
        return
    print(format_table(summary["rows"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun, ranks other than 0 log only warnings and show no library progress
    # bars, so that each line appears once.
    _configure_logging(args.verbose, args.quiet or not is_main_process())
    if not is_main_process():
        _disable_library_progress_bars()
    try:
        return args.handler(args)
    except LmevalError as error:
        if getattr(error, "reported_by_rank_zero", False):
            return 2
        if args.verbose:
            traceback.print_exc()
        # A message may quote a library's multi-line error, but the command prints one line.
        message = " ".join(str(error).split())
        rank = "" if is_main_process() else f" (rank {os.environ['RANK']})"
        print(f"lmeval: error{rank}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmeval: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout (e.g. head) has gone. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    file_values = load_config_file(args.config) if args.config else {}
    skip = {"command", "handler", "config", "verbose", "quiet"}
    cli_values = {k: v for k, v in vars(args).items() if k not in skip}
    config = build_config(file_values, cli_values)
    validate_config(config)
    return config


def _disable_library_progress_bars() -> None:
    """Hide the progress bars of datasets, transformers and huggingface_hub too.

    The environment variables cover the libraries not imported yet, which read them
    at import. The calls cover those already imported, e.g. when ``main`` runs in a
    process that loaded them before.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    # transformers' GGUF conversion calls tqdm directly; tqdm reads TQDM_DISABLE
    # when it is first imported, which the lazy imports of the CLI leave until later.
    os.environ["TQDM_DISABLE"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils.tqdm import disable_progress_bars as disable_datasets_bars

        disable_datasets_bars()


def _print_results(results: dict, as_json: bool) -> None:
    if as_json:
        json.dump(results, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
        return
    from lmeval.results import format_table

    print(format_table(results))


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid batch size {value!r}: use a positive integer or auto"
        ) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"invalid batch size {value!r}: must be at least 1")
    return size


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Third-party libraries log a lot at INFO; keep them at warnings unless verbose.
    for name in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _version() -> str:
    from lmeval import __version__

    return f"lmeval {__version__}"


def _elapsed(start: float) -> float:
    return time.perf_counter() - start
