"""Request bodies of the OpenAI-compatible server. Strict types, so that a wrong type is a 400, never a guess:
"16" is not an int and "true" is not a bool. OpenAI fields kvpred does not implement are ignored where they cannot
change the reply (user, metadata, a penalty of 0, empty tools...), as most OpenAI-compatible servers do, and a 400
where they would (a penalty, a logit bias, JSON mode, tools to call); any other unknown field is a 400 naming it, so
that a misspelt extension (`kv_mod`) is not silently ignored."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KVMode = Literal["exact", "aux", "predicted"]
RefinePolicy = Literal["off", "eager", "lazy", "auto"]  # kvpred.refine.REFINE_CHOICES
# OpenAI's request fields (completions and chat) that kvpred accepts and ignores
OPENAI_IGNORED = frozenset({
    "audio", "best_of", "frequency_penalty", "function_call", "functions", "logit_bias", "metadata", "modalities",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format",
    "safety_identifier", "service_tier", "store", "suffix", "tool_choice", "tools", "top_logprobs", "user",
    "verbosity", "web_search_options"})
# ... of which these would change the reply: accepted only at a value that changes nothing
NEUTRAL_ONLY = {
    "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0, "logit_bias": lambda v: not v,
    "best_of": lambda v: v == 1, "suffix": lambda v: not v, "tools": lambda v: not v, "functions": lambda v: not v,
    "tool_choice": lambda v: v in ("none", "auto"), "function_call": lambda v: v in ("none", "auto"),
    "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
    "top_logprobs": lambda v: v == 0,  # chat logprobs are refused; completions count alternatives in `logprobs`
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):  # as in OpenAI's API: the official client sends null for a field not given
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model_config = ConfigDict(extra="forbid")  # merged with _Body's: strict as well
    model: str
    max_tokens: int | None = Field(None, ge=0)  # None: 16 for completions, the rest of the context for chat
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # 0 means greedy decoding
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=1)  # one choice per prompt
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 64)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    # kvpred's extensions
    kv_mode: KVMode | None = None  # None: the server's --default-mode
    exact_tail: int | None = Field(None, ge=1)  # prompt tokens the base computes itself (predicted mode)
    refine: RefinePolicy | None = None  # None: the server's --refine where refinement applies
    refine_chunk: int | None = None  # None: the server's --refine-chunk; >= 2, checked with a reason in serve.py
    session: str | None = Field(None, min_length=1, max_length=256)  # chat only: reuse earlier turns' cache

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data):
        if not isinstance(data, dict):
            return data
        for key, neutral in NEUTRAL_ONLY.items():
            if data.get(key) is not None and not neutral(data[key]):
                raise ValueError(f"{key} {data[key]!r} is not implemented by kvpred, and would change the reply: "
                                 "leave it out")
        return {k: v for k, v in data.items() if k not in OPENAI_IGNORED}

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options apply to a streamed reply: send stream=true, or leave them out")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top alternatives per token; 0 still gives token_logprobs


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id ... go to the chat template as given
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # OpenAI's; another is a 400
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    tokens: list[int]
