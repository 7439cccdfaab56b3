"""Prompt encoding and streaming helpers shared by the CLI, the server and the evaluators."""
from __future__ import annotations

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
