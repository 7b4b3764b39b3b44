"""The ``lmeval kl`` and ``lmeval drift`` commands: options, config files and tables.

The commands parse options into a :class:`lmeval.kl_run.KLConfig` (or
:class:`lmeval.drift.DriftConfig`), call the library and print the results: a table
on stdout, or the results object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmeval.cli import (
    _disable_library_progress_bars,
    add_data_arguments,
    add_model_arguments,
    add_output_arguments,
    add_scoring_arguments,
)
from lmeval.distributed import is_main_process
from lmeval.errors import ConfigError

KL_EXAMPLE = """\
examples:
  lmeval kl --model smollm2-135m --dtype bfloat16 --reference smollm2-135m \\
      --task wikitext2 --data-files wiki.test.raw --limit 3
  lmeval kl --reference base/ --save-reference base-ref.safetensors \\
      --task wikitext2 --data-files wiki.test.raw
  lmeval kl --model finetuned/ --reference-cache base-ref.safetensors \\
      --task wikitext2 --data-files wiki.test.raw --output results/finetuned-kl
"""

DRIFT_EXAMPLE = """\
examples:
  lmeval drift --reference base/ run/checkpoint-100 run/checkpoint-200 \\
      run/checkpoint-300 --data held-out.txt --output results/drift
  lmeval drift --reference-cache base-ref.safetensors run/checkpoint-* \\
      --task wikitext2 --data-files wiki.test.raw --output results/drift
"""

#: Rows of the worst-token list printed under the table.
PRINTED_WORST_TOKENS = 5
# lmeval.kl_scoring.KL_CHUNK_BYTES in MiB, written out so that --help imports no torch.
KL_CHUNK_MIB = 32


def add_kl_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``kl`` and ``drift`` subcommands to the ``lmeval`` parser."""
    kl = commands.add_parser(
        "kl",
        help="measure how far a model's next-token distributions are from a reference's",
        description="Run a model and a reference model on identical token windows and "
        "report the KL divergence in both directions, Jensen-Shannon divergence, top-1 "
        "and top-5 agreement, the change in the true token's probability and both "
        "perplexities. Scoring options default as for ppl, except that "
        "--logits-chunk-size defaults to 32 MiB of float32 logits, and that with "
        "--reference-cache the protocol, window size, stride, batch size, chunk size "
        "and padding side default to the cache's. --resume is not supported.",
        epilog=KL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(kl)
    _add_reference_arguments(kl, save=True)
    add_data_arguments(kl)
    add_scoring_arguments(kl, chunk_mib=KL_CHUNK_MIB)
    add_output_arguments(kl, resume=False)
    _add_report_arguments(kl)
    kl.set_defaults(handler=run_kl_command)

    drift = commands.add_parser(
        "drift",
        help="compare a series of checkpoints with one reference",
        description="Compare every checkpoint with the reference, reusing one reference "
        "cache, and write a table (drift.md, drift.csv, drift.json) and a plot "
        "(drift.png) of mean KL and perplexity against training step. The step comes "
        "from a checkpoint's trainer_state.json or a name like checkpoint-500; without "
        "it, checkpoints are plotted in the order given. Running the same command again "
        "skips every checkpoint whose results exist for the same options.",
        epilog=DRIFT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drift.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="model directories (or any model spec) to compare, e.g. run/checkpoint-500",
    )
    add_model_arguments(drift)
    _add_reference_arguments(drift, save=False)
    add_data_arguments(drift)
    add_scoring_arguments(drift, chunk_mib=KL_CHUNK_MIB)
    add_output_arguments(drift, resume=False)
    _add_report_arguments(drift)
    drift.set_defaults(handler=run_drift_command)


def _add_reference_arguments(parser: argparse.ArgumentParser, *, save: bool) -> None:
    group = parser.add_argument_group("reference")
    group.add_argument(
        "--reference",
        help="the model to compare with: built-in name, model directory, GGUF file or hub id",
    )
    group.add_argument(
        "--reference-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weight dtype of the reference (default float32)",
    )
    group.add_argument("--reference-revision", help="branch, tag or commit of a hub reference")
    if save:
        group.add_argument(
            "--save-reference",
            metavar="FILE",
            help="also write the reference's distributions to FILE (a safetensors reference "
            "cache) for later runs; without --model, only write the cache",
        )
        cache_help = "read the reference from FILE, written by --save-reference, instead of "
        cache_help += "running it; --reference, if given too, must name the cached model"
    else:
        cache_help = "reference cache to reuse, or to write if FILE does not exist "
        cache_help += "(default: reference-cache.safetensors in --output)"
    group.add_argument("--reference-cache", metavar="FILE", help=cache_help)
    group.add_argument(
        "--cache-format",
        choices=("exact", "compact"),
        help="exact: every log-probability, N positions x V tokens; compact: the top "
        "--cache-top-k log-probabilities and the rest's mass per position, which makes "
        "every KL value a lower bound (default exact)",
    )
    group.add_argument(
        "--cache-dtype",
        choices=("float32", "float16"),
        help="dtype of exact log-probabilities (default float32; float16 halves the file "
        "and rounds each log-probability to 11 significant bits)",
    )
    group.add_argument(
        "--cache-top-k",
        type=int,
        metavar="K",
        help="tokens stored per position in a compact cache (default 64, at least 5)",
    )


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("report")
    group.add_argument(
        "--worst-tokens",
        type=int,
        metavar="N",
        help="report the N tokens with the largest KL(reference || model) (default 10)",
    )


def run_kl_command(args: argparse.Namespace) -> int:
    from lmeval.kl_run import KL_CONFIG_TYPES, KLConfig, run_kl

    config = _config_from_args(args, KLConfig, KL_CONFIG_TYPES)
    if not config.progress:
        _disable_library_progress_bars()
    results = run_kl(config, progress_bar=config.progress)
    if not is_main_process():
        return 0
    if config.json:
        _print_json(results)
    else:
        print(format_kl_table(results))
    return 0


def run_drift_command(args: argparse.Namespace) -> int:
    from lmeval.drift import DRIFT_CONFIG_TYPES, DriftConfig, format_markdown_table, run_drift

    if args.checkpoints == []:
        args.checkpoints = None  # so that a config file may list them
    if args.model is not None:
        raise ConfigError(
            "drift takes the checkpoints as arguments, not --model; "
            f"run lmeval drift --reference REF {args.model} ..."
        )
    config = _config_from_args(args, DriftConfig, DRIFT_CONFIG_TYPES)
    if not config.progress:
        _disable_library_progress_bars()
    results = run_drift(config, progress_bar=config.progress)
    if not is_main_process():
        return 0
    if config.json:
        _print_json(results)
    else:
        print(format_markdown_table(results["rows"]))
        print()
        for name, path in results["files"].items():
            print(f"{name}: {path}")
    return 0


def _config_from_args(args: argparse.Namespace, config_class: type, types: dict):
    from lmeval.config import load_config_file

    file_values = load_config_file(args.config, config_class, types) if args.config else {}
    skip = {"command", "handler", "config", "verbose", "quiet"}
    cli_values = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    return config_class(**{**file_values, **cli_values})


def _print_json(results: dict) -> None:
    json.dump(results, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


# Tables -------------------------------------------------------------------------------


def format_kl_table(results: dict) -> str:
    """Render a kl results object (or a reference-cache-only one) as a text table."""
    if "metrics" not in results:
        return _format_cache_only(results)
    m = results["metrics"]
    rows = [
        ("KL(model || reference)", _divergence(m["kl_model_ref"])),
        ("KL(reference || model)", _divergence(m["kl_ref_model"])),
        ("Jensen-Shannon", _value(m["js"])),
        ("total variation", _value(m["tv"])),
        ("top-1 agreement", _value(m["top1_agreement"])),
        ("top-5 overlap", _value(m["top5_overlap"])),
        (
            "delta p (model - ref)",
            f"mean {_value(m['delta_p']['mean'])}  rms {_value(m['delta_p']['rms'])}",
        ),
        (
            "perplexity model / ref",
            f"{_value(m['perplexity_model'])} / {_value(m['perplexity_ref'])}  "
            f"ln ratio {_value(m['log_ppl_ratio'])}",
        ),
        ("k1 / k2 / k3", " / ".join(_value(m[name]) for name in ("k1", "k2", "k3"))),
        ("tokens (documents)", f"{m['num_tokens']:,} ({m['num_documents']:,})"),
        ("estimate", _estimate_label(results)),
        ("vocabulary", results["vocabulary"]["note"]),
        ("model", _model_label(results["model"])),
        ("reference", _model_label(results["reference"])),
        ("protocol", f"{results['protocol']['name']}, window {results['protocol']['window_size']}"),
        ("tokens/s", f"{results['timing']['tokens_per_second']:,.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    worst = results.get("worst_tokens") or []
    if worst:
        lines += ["", "largest KL(reference || model):"]
        shown = worst[:PRINTED_WORST_TOKENS]
        lines += [_worst_line(rank, record) for rank, record in enumerate(shown, 1)]
    return "\n".join(lines)


def _format_cache_only(results: dict) -> str:
    cache = results["reference_cache"]
    return (
        f"wrote reference cache {cache['path']}: {cache['format']}, "
        f"{cache['num_positions']:,} positions x {cache['vocabulary_size']:,} tokens, "
        f"{cache['size']}\n{cache['bound']}"
    )


def _divergence(summary: dict) -> str:
    text = f"mean {_value(summary['mean'])}"
    if isinstance(summary.get("stderr"), float):
        text += f" ± {summary['stderr']:.2g}"
    for name in ("median", "p99", "max"):
        text += f"  {name} {_value(summary[name])}"
    return text


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _estimate_label(results: dict) -> str:
    cache = results.get("reference_cache")
    if cache is None:
        return "exact (reference run alongside the model)"
    return f"{cache['estimate']} (reference cache {cache['path']}, {cache['format']})"


def _model_label(identity: dict) -> str:
    return f"{identity['spec']} ({identity['dtype']})"


def _worst_line(rank: int, record: dict) -> str:
    model = ", ".join(f"{p['token']!r} {p['probability']:.3g}" for p in record["model_top"])
    reference = ", ".join(f"{p['token']!r} {p['probability']:.3g}" for p in record["reference_top"])
    return (
        f"  {rank}. document {record['document']} token {record['position']} "
        f"{record['token']!r}: KL {_value(record['kl_ref_model'])}; context "
        f"{record['context'][-40:]!r}; model {model}; reference {reference}"
    )
