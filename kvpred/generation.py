"""Prompt encoding and streaming helpers shared by the CLI, the server and the evaluators, and the `kvpred generate`
command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TextStreamer

from .data import expand_source
from .models import KVPredError, read_jsonl


def check_text(text: str, what: str = "prompt") -> str:
    """`text`, if a tokenizer can take it: not a lone UTF-16 surrogate in it (JSON "\\ud800"), nor the stand-ins
    Python makes for bytes that are not UTF-8 (a command line or stdin in another encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KVPredError(f"the {what} is not valid UTF-8 text (character {err.start}: {text[err.start]!r})") from None
    return text


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask [B, T]; with `chat`, each prompt becomes one user turn."""
    if not prompts or any(not p for p in prompts):
        raise KVPredError("empty prompt: give at least one character of text")
    for prompt in prompts:
        check_text(prompt)
    if chat:
        if tokenizer.chat_template is None:
            raise KVPredError("this model's tokenizer has no chat template; drop --chat")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    if enc.input_ids.shape[1] == 0:
        raise KVPredError("the prompt encodes to no tokens")
    return enc.input_ids, enc.attention_mask


@dataclass
class _Tokenized:
    text: str
    ids: list[int]
    cut: tuple[int, int]  # (characters, ids) of `text` up to and with its last added token; (0, 0) where none


class ConversationTokenizer:
    """Token ids of texts that extend earlier ones (a chat rendered again at every turn, by a session or by a
    stateless client that sends the whole conversation each time), tokenizing only what follows the last added
    token (a chat template's special token) that ordinary text follows, in the longest of the `keep` most recent
    texts that the new one extends.
    Fast tokenizers cut a text at its added tokens before anything else, so what follows one is tokenized apart from
    what precedes it. As a check, the earlier text's ids after the cut must come out the same again, so the cut is
    the last added token that ordinary text follows (a template's prompt may end with added tokens, which would
    leave the check nothing to compare); where they do not (an added token that strips the whitespace after it, a
    Metaspace pre-tokenizer that marks a text's start, a normalizer that looks across), or where no recent text is
    extended, the whole text is tokenized. Tokenizing a whole 1685-token SmolLM2 conversation took 5.3-8.0 ms
    of a chat session turn's 18-24 ms time to first token on an H100 host (benchmarks/results/h100/session_pipeline).
    """

    def __init__(self, tokenizer, keep: int = 1):
        self.tokenizer, self.keep = tokenizer, keep
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}))
        self.recent: list[_Tokenized] = []  # oldest first

    def __call__(self, text: str) -> list[int]:
        extended = [r for r in self.recent if r.cut[1] and text.startswith(r.text)] if self.tokenizer.is_fast else []
        done = None
        if extended:
            earlier = max(extended, key=lambda r: r.cut[1])
            done = self._after(text, earlier)
            if done.ids[:len(earlier.ids)] != earlier.ids:  # the part after the cut came out differently
                done = None
            else:
                self.recent.remove(earlier)  # its conversation went on: keep the longer text in its place
        done = done or self._after(text, None)
        self.recent = (self.recent + [done])[-self.keep:]
        return done.ids

    def _after(self, text: str, earlier: _Tokenized | None) -> _Tokenized:
        """`text` tokenized after `earlier`'s cut (its ids up to there kept), or whole."""
        if not self.tokenizer.is_fast:  # no offsets, so no cuts: every text whole
            return _Tokenized(text, self.tokenizer(text, add_special_tokens=False).input_ids, (0, 0))
        chars, count = earlier.cut if earlier is not None else (0, 0)
        enc = self.tokenizer(text[chars:], add_special_tokens=False, return_offsets_mapping=True)
        cut = (chars, count)
        ids = enc.input_ids
        for i in reversed(range(len(ids) - 1)):  # an added token that ordinary text follows
            if ids[i] in self.added and ids[i + 1] not in self.added:
                cut = (chars + enc.offset_mapping[i][1], count + i + 1)
                break
        return _Tokenized(text, (earlier.ids[:count] if earlier is not None else []) + enc.input_ids, cut)


def cut_at_stop(text: str, stops) -> str:
    """`text` up to the first of the `stops` strings it holds (empty ones never match), else all of it."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[:min(cuts)] if cuts else text


def visible_text(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The part of generated `text` that may be sent: up to the first stop string (then True), else all but a tail
    that could still grow into a stop string or is an unfinished UTF-8 character (decoded as U+FFFD)."""
    cut = cut_at_stop(text, stops)
    if len(cut) < len(text):  # a stop string begins there
        return cut, True
    safe = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
    return safe[:len(safe) - hold], False


def chat_exact_tail(tokenizer) -> int:
    """The exact tail of chat prompts for a checkpoint that records none (`KVPredictionModel.chat_tail`): the tokens
    the chat template appends after the last user message to open the assistant's reply (SmolLM2:
    "<|im_end|>\n<|im_start|>assistant\n", 6 tokens), at least 1. An auxiliary and predictor trained on plain text
    predict these special tokens badly: with SmolLM2's round-4 default (never trained on chats) and the paper's tail
    of one token, the first token of each of 100 TriviaQA questions asked as chats was a newline or an end of turn,
    and never exact mode's; with this tail, none was, and 62 were exact mode's (benchmarks/results/chat_tail)."""
    if tokenizer.chat_template is None:
        return 1
    a, b = (tokenizer(text, add_special_tokens=False).input_ids for text in _two_chat_prompts(tokenizer))
    return max(_common_suffix(a, b), 1)


def reply_opening(tokenizer) -> str:
    """The text the chat template appends after the last user message to open the assistant's reply (SmolLM2:
    "<|im_end|>\n<|im_start|>assistant\n")."""
    if tokenizer.chat_template is None:
        raise KVPredError("this model's tokenizer has no chat template")
    a, b = _two_chat_prompts(tokenizer)
    return a[len(a) - _common_suffix(a, b):]


def _two_chat_prompts(tokenizer) -> tuple[str, str]:
    """Two one-turn chat prompts whose user messages end differently: what they share at the end opens the reply."""
    return tuple(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
                 for content in ("first question", "second request?"))


def _common_suffix(a, b) -> int:
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    return common


def read_chat_prompts(source: str, tokenizer, limit: int) -> list[str]:
    """`chat_prompts` of the .jsonl files of `source` (a file, folder or glob), which must not be evaluation data:
    what calibrates a model."""
    files = [f for f in expand_source(source) if f.suffix == ".jsonl"]
    if not files:
        raise KVPredError(f"chats {source!r} hold no .jsonl files")
    return chat_prompts(files, tokenizer, limit)


def chat_prompts(files: list[Path], tokenizer, limit: int | None) -> list[str]:
    """Up to `limit` chat prompts from .jsonl `files`, each rendered up to the opening of the conversation's last
    assistant reply. A line holds either "messages" (a list of {"role", "content"}, OpenAI-style: the turns up to its
    last user message become the prompt) or "text", a conversation already rendered in the tokenizer's template (what
    `kvpred data sample --chat` writes), cut after the opening of its last reply."""
    opening = reply_opening(tokenizer)
    prompts = []
    for path in files:
        for lineno, row in read_jsonl(path):
            if len(prompts) == limit:
                return prompts
            prompts.append(_chat_prompt(row, tokenizer, opening, f"{path}:{lineno}"))
    if not prompts:
        raise KVPredError(f"{', '.join(map(str, files))} hold no conversations")
    return prompts


def _chat_prompt(row, tokenizer, opening: str, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        turns = row["messages"]
        if not all(isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                   for t in turns):
            raise KVPredError(f"{where}: every message needs a \"role\" and a \"content\" string")
        roles = [turn["role"] for turn in turns]
        if "user" not in roles:
            raise KVPredError(f"{where}: the conversation has no user message")
        last_user = len(roles) - 1 - roles[::-1].index("user")
        return tokenizer.apply_chat_template(turns[:last_user + 1], tokenize=False, add_generation_prompt=True)
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        end = row["text"].rfind(opening)
        if end < 0:
            raise KVPredError(f"{where}: the text is not a chat in this tokenizer's template (no {opening!r} opens "
                              "an assistant reply)")
        return row["text"][:end + len(opening)]
    raise KVPredError(f"{where} has neither a \"messages\" list nor a \"text\" string")


class TimedStreamer(TextStreamer):
    """Records when the first new token arrives (time to first token); optionally prints text as it comes."""

    def __init__(self, tokenizer, echo: bool = False):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo = echo
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.echo:
            print(text, end="" if not stream_end else "\n", flush=True, file=sys.stdout)

    def ttft(self, start: float) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - start


# ---------------------------------------------------------------- the `kvpred generate` command
def register(subparsers) -> None:
    from .cli import add_model_arguments, command_help, positive_int

    p = subparsers.add_parser("generate", help=command_help("generate"),
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
    still grow into one is held back until it cannot (`visible_text`)."""

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
    from .cli import load_model

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
