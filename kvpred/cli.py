"""The `kvpred` command line. Each command lives in the module that holds its work and registers itself here
(`register(subparsers)`), taking its one-line help from COMMANDS."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys

from .errors import KVPredError

DEFAULT_MODEL = "smollm2-135m"
# command -> (the kvpred module that registers it, its one-line help). `kvpred --help` lists the commands from here
# without importing their modules, and a command imports only its own: their torch and transformers take 6-8 s to
# import on a 2-core machine, which `kvpred --help` took, against 0.1 s now (benchmarks/results/cli_help.txt).
COMMANDS = {
    "generate": ("generation", "generate text from a prompt (--json adds its time to the first token)"),
    "data": ("data", "build and inspect training token shards"),
    "narrow": ("narrow", "cut a narrow auxiliary (fewer layers, heads, MLP channels) out of a base model"),
    "fit": ("fit", "training-free predictor: ridge regression on a calibration corpus"),
    "compress": ("fit", "factorise a checkpoint's predictor (--rank) or its auxiliary's adapters (--aux-rank)"),
    "train": ("train", "distil auxiliary + predictor from the frozen base"),
    "bench": ("bench", "benchmarks: time to first token"),
    "eval": ("evaluate", "evaluate KV prediction against the exact base, the auxiliary alone and truncation"),
    "plot": ("plot", "Pareto figure (accuracy vs TTFT FLOPs reduction) from eval results"),
    "serve": ("serve", "serve the model over an OpenAI-compatible HTTP API"),
    "chat": ("refine", "interactive multi-turn chat reusing the cache of earlier turns"),
    "calibrate": ("refine", "measure a model's adaptive-refinement thresholds and chat tail, and save them in its "
                            "config"),
}
DTYPE_NAMES = ("bfloat16", "float16", "float32")
STATES_DEFAULT = re.compile(r"\(default|default:|by default")  # a help text that already gives its default


def __getattr__(name: str):
    if name == "DTYPES":  # {name: torch dtype}, made on first use: the command line itself needs no torch
        import torch

        return {dtype: getattr(torch, dtype) for dtype in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def command_help(command: str) -> str:
    """The one-line help of `command`, for its module's `register`."""
    return COMMANDS[command][1]


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--model / --device / --dtype, shared by every subcommand that loads a KVPredictionModel; without `dtype`
    (commands that measure in float32 whatever the serving dtype) no --dtype."""
    import torch

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="kvpred checkpoint folder, embedded default (smollm2-135m), or a base model "
                             "(HF folder, hub id, .gguf) to wrap with an identity-initialised pruned auxiliary")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is a GPU)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                            help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")


def add_calibration_arguments(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    """--data / --tokens / --seq-len / --batch-size, for subcommands that measure on calibration text."""
    parser.add_argument("--data", required=data_required, help="token shard folder made by `kvpred data build`")
    parser.add_argument("--tokens", type=positive_int, default=65_536,
                        help="calibration tokens (read in whole batches of --batch-size x --seq-len)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration window")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward")


def add_checkpoint_out_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """--out / --overwrite / --save-dtype, for subcommands that write a checkpoint from one loaded in float32."""
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a kvpred checkpoint already in --out (refused without this flag)")
    parser.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the saved tensors (bfloat16: half the size, as the shipped default is stored)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse prints the error as `argument --flag: ...`)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def layer_list(text: str) -> list[int]:
    """argparse type: comma-separated layer indices, e.g. 0,4,8."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 0,4,8, got {text!r}")


def load_model(args: argparse.Namespace):
    import torch

    from .model import KVPredictionModel

    dtype = getattr(torch, args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32"))
    return KVPredictionModel.from_pretrained(args.model, dtype=dtype, device=args.device)


def build_parser(commands: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The `kvpred` parser, with every command of `commands` (default: all) registered by its module; the others are
    listed with their help only, their modules not imported."""
    parser = argparse.ArgumentParser(
        prog="kvpred",
        description="KV prediction: a small auxiliary model and a learned predictor fill the base model's KV "
                    "cache for the prompt, so the first token comes sooner (Horton et al., arXiv 2410.08391).")
    parser.add_argument("--version", action="version", version=f"kvpred {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted, registered = {COMMANDS[c][0] for c in (COMMANDS if commands is None else commands)}, set()
    for name, (module, summary) in COMMANDS.items():  # in this order in `kvpred --help`
        if module not in wanted:
            sub.add_parser(name, help=summary)
        elif module not in registered:  # its register adds all its commands
            importlib.import_module(f"kvpred.{module}").register(sub)
            registered.add(module)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default, unless it already says it or there is none to say (flags, None);
    subcommands' too, at any depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _show_defaults(subparser)
        elif (action.option_strings and action.help and action.help != argparse.SUPPRESS
              and action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
              and not STATES_DEFAULT.search(action.help)):
            action.help += " (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvpred")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # `kvpred` has no option with a value
    try:
        args = build_parser((command,) if command in COMMANDS else ()).parse_args(argv)
        return args.func(args)
    except KVPredError as err:
        print(f"kvpred: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C in any command: no traceback (`kvpred train` saves a checkpoint first)
        print("kvpred: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl+C
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"kvpred: error: cannot write the output: {err.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
