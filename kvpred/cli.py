"""The `kvpred` command line. Each subcommand lives in the module that holds its work and registers itself here."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys
import time

import torch

from .generation import TimedStreamer
from .models import KVPredError
from .serve import visible_text

DEFAULT_MODEL = "smollm2-135m"
# Modules that contribute subcommands through `register(subparsers)`; missing ones are skipped.
SUBCOMMAND_MODULES = ("data", "narrow", "fit", "train", "bench", "evaluate", "plot", "serve", "refine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATES_DEFAULT = re.compile(r"\(default|default:|by default")  # a help text that already gives its default


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--model / --device / --dtype, shared by every subcommand that loads a KVPredictionModel; without `dtype`
    (commands that measure in float32 whatever the serving dtype) no --dtype."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="kvpred checkpoint folder, embedded default (smollm2-135m), or a base model "
                             "(HF folder, hub id, .gguf) to wrap with an identity-initialised pruned auxiliary")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is a GPU)")
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
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
    from .model import KVPredictionModel

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda")
                                                   else torch.float32)
    return KVPredictionModel.from_pretrained(args.model, dtype=dtype, device=args.device)


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, timing the first token",
                       description="Run one prompt through exact, aux or predicted prefill, then decode with "
                                   "the base (the auxiliary in aux mode).")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--mode", choices=("exact", "aux", "predicted"), default="predicted",
                   help="exact: base alone; aux: auxiliary alone; predicted: KV prediction (default)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--exact-tail", type=int, default=None,
                   help="prompt tokens the base runs itself (default: the paper's 1; with --chat, the model's "
                        "chat tail: the checkpoint's own, else the template's tokens that open the reply)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample: softmax temperature (default 1)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus cut (default 1: none)")
    p.add_argument("--top-k", type=int, default=None, help="with --sample: the k most likely tokens (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of --sample (default 0)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--refine", choices=("off", "eager", "lazy", "auto"), default="off",
                   help="predicted mode: after the first token, replace the predicted cache by the exact one, "
                        "chunk by chunk while decoding (auto: decide from the first token's confidence)")
    p.add_argument("--refine-chunk", type=int, default=256,
                   help="with --refine: prompt tokens the base refines per decode step (default 256)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (not with --json, "
                                                        "which prints one object at the end)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, mode, ttft_s, ...")
    p.set_defaults(func=_generate)


def check_generate_options(args: argparse.Namespace) -> None:
    """Options that would change nothing are refused: sampling settings without --sample, and those that act only
    in predicted mode elsewhere, as the server refuses them (a 400)."""
    unused = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                                       ("--top-k", args.top_k)) if value is not None and not args.sample]
    if unused:
        raise KVPredError(f"{', '.join(unused)} set(s) how to sample, but decoding is greedy without --sample")
    if args.mode == "predicted":
        return
    if args.refine != "off":
        raise KVPredError(f"--refine {args.refine} applies only to --mode predicted (it replaces a predicted cache "
                          f"by the exact one), but this runs --mode {args.mode}; drop --refine or use --mode predicted")
    if args.exact_tail not in (None, 1):
        raise KVPredError(f"--exact-tail {args.exact_tail} applies only to --mode predicted (the prompt tokens the "
                          f"base runs itself instead of predicting their keys and values), but this runs --mode "
                          f"{args.mode}, which predicts nothing; drop --exact-tail or use --mode predicted")


class StopStreamer(TimedStreamer):
    """Prints generated text as `kvpred serve` sends it: never a stop string or anything after it; a tail that could
    still grow into one is held back until it cannot (serve.visible_text)."""

    def __init__(self, tokenizer, stops: list[str], echo: bool):
        super().__init__(tokenizer, echo=echo)
        self.stops, self.text, self.printed = tuple(stops), "", 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        visible, stopped = visible_text(self.text, self.stops)
        if stream_end and not stopped:
            visible = self.text
        if self.echo:
            print(visible[self.printed:], end="\n" if stream_end else "", flush=True)
        self.printed = max(self.printed, len(visible))


def _generate(args: argparse.Namespace) -> int:
    from .generation import encode_prompts

    check_generate_options(args)
    model = load_model(args)
    torch.manual_seed(args.seed)
    input_ids, attention_mask = encode_prompts(model.tokenizer, [args.prompt], chat=args.chat)
    streamer = StopStreamer(model.tokenizer, args.stop or [], echo=args.stream and not args.json)
    tail = args.exact_tail
    if tail is None:
        tail = model.chat_tail if args.chat and args.mode == "predicted" else 1
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.sample else {}
    options = dict(exact_tail=tail, max_new_tokens=args.max_new_tokens, do_sample=args.sample, streamer=streamer,
                   **{k: v for k, v in sampling.items() if v is not None})
    refine_info = {}
    start = time.perf_counter()
    if args.refine != "off" and args.mode == "predicted":
        from .refine import generate_refined

        out, info = generate_refined(model, input_ids, attention_mask, refine=args.refine,
                                     chunk_size=args.refine_chunk, stop_strings=args.stop, **options)
        refine_info = {"refine": info.get("policy", args.refine), "exact_from": info.get("exact_from")}
    else:
        out = model.generate(input_ids, attention_mask, mode=args.mode, stop_strings=args.stop, **options)
    total = time.perf_counter() - start
    new = out[0, input_ids.shape[1]:].tolist()
    text = model.tokenizer.decode(new, skip_special_tokens=True)
    visible, stopped = visible_text(text, tuple(args.stop or ()))
    text = visible if stopped else text  # the stop string ends the text and is not part of it, as in kvpred serve
    if args.json:
        print(json.dumps({"text": text, "tokens": new, "mode": args.mode, "ttft_s": streamer.ttft(start),
                          "total_s": total, "prompt_tokens": input_ids.shape[1], "new_tokens": len(new),
                          "model": args.model, **refine_info}))
    elif not args.stream:  # (the streamer ended a streamed text with its newline)
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpred",
        description="KV prediction: a small auxiliary model and a learned predictor fill the base model's KV "
                    "cache for the prompt, so the first token comes sooner (Horton et al., arXiv 2410.08391).")
    parser.add_argument("--version", action="version", version=f"kvpred {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_generate(sub)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"kvpred.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"kvpred.{name}":
                raise
            continue
        if hasattr(module, "register"):
            module.register(sub)
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
    try:
        args = build_parser().parse_args(argv)
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
