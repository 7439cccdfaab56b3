"""Prompt encoding and streaming helpers shared by the CLI, the server and the evaluators."""
from __future__ import annotations

import sys
import time

import torch
from transformers import TextStreamer

from .models import KVPredError


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask [B, T]; with `chat`, each prompt becomes one user turn."""
    if not prompts or any(not p for p in prompts):
        raise KVPredError("empty prompt: give at least one character of text")
    if chat:
        if tokenizer.chat_template is None:
            raise KVPredError("this model's tokenizer has no chat template; drop --chat")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    if enc.input_ids.shape[1] == 0:
        raise KVPredError("the prompt encodes to no tokens")
    return enc.input_ids, enc.attention_mask


def chat_exact_tail(tokenizer) -> int:
    """The exact tail of chat prompts for a checkpoint that records none (`KVPredictionModel.chat_tail`): the tokens
    the chat template appends after the last user message to open the assistant's reply (SmolLM2:
    "<|im_end|>\n<|im_start|>assistant\n", 6 tokens), at least 1. An auxiliary and predictor trained on plain text
    predict these special tokens badly: with SmolLM2's round-4 default (never trained on chats) and the paper's tail
    of one token, the first token of each of 100 TriviaQA questions asked as chats was a newline or an end of turn,
    and never exact mode's; with this tail, none was, and 62 were exact mode's (benchmarks/results/chat_tail)."""
    if tokenizer.chat_template is None:
        return 1

    def ids(content: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids

    a, b = ids("first question"), ids("second request?")
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    return max(common, 1)


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
