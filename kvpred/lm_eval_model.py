"""lm-evaluation-harness model `kvpred`: any harness task through exact / aux / predicted / truncate prefill.

lm-eval (0.4.x) finds models only in its own registry and scans no entry-point group, so this module
registers `kvpred` when imported. Use it through the wrapper, which takes lm-eval's own arguments:

    python -m kvpred.lm_eval_model run --model kvpred \\
        --model_args pretrained=smollm2-135m,mode=predicted,dtype=bfloat16 --tasks arc_easy --batch_size 32

or from Python: `import kvpred.lm_eval_model` before `lm_eval.simple_evaluate(model="kvpred", ...)`.

Model arguments: pretrained (kvpred checkpoint, embedded default or base model; or a KVPredictionModel),
mode (exact | aux | predicted | truncate; default predicted), exact_tail (predicted mode: prompt tokens the
base runs itself; default 1), dtype (float32 | bfloat16 | float16),
max_gen_toks (default 256), truncate_ratio (default: the params-rule FLOPs reduction), add_bos_token (as lm-eval's
hf model: default the tokenizer's own), aux_dtype and predictor_dtype (auto | model | a dtype, as the attributes of
KVPredictionModel: "auto" runs the auxiliary and predictor in bf16 on an fp32 model on CPUs with bf16 dot products,
faster, but then scores can move slightly with the batch; "model" keeps them in the model's dtype). Device and batch
size come from lm-eval's own --device / --batch_size (giving them in --model_args as well is an error in lm-eval).
--apply_chat_template uses the tokenizer's chat template.

How each request type uses the mode:
* loglikelihood: the context goes through `mode`; the base runs the context's last `exact_tail` tokens and
  scores the continuation (prefill with exact_tail = len(continuation) + exact_tail), as `kvpred eval` does.
* loglikelihood_rolling: lm-eval's disjoint windows of the model's context length, each scored as a
  loglikelihood request. A window's context is the one token before it, except in the last window, which lm-eval
  fills up with earlier text as context; that goes through `mode`.
* generate_until: the prompt through `mode`, then the base decodes (the auxiliary in aux mode).
"""
from __future__ import annotations

import json
import logging
import math

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import MODEL_REGISTRY, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .generation import cut_at_stop
from .models import KVPredError
from .tasks import MODES, generate, score

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's, by priority
log = logging.getLogger(__name__)


class KVPredLM(TemplateLM):
    def __init__(self, pretrained="smollm2-135m", mode: str = "predicted", device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 8, max_gen_toks: int = 256,
                 truncate_ratio: float | None = None, exact_tail: int = 1, add_bos_token: bool | None = None,
                 aux_dtype: str = "auto", predictor_dtype: str = "auto", **kwargs):
        super().__init__()
        from .evaluate import flop_ratio
        from .model import KVPredictionModel

        if mode not in MODES:
            raise KVPredError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        unused = {k: v for k, v in kwargs.items() if v is not None and k not in ("max_batch_size", "trust_remote_code")}
        if unused:
            raise KVPredError(f"kvpred lm-eval model got unknown arguments {sorted(unused)}")
        # lm-eval passes --model_args values as strings, numbers or booleans, as they parse
        self.batch_size = _whole(batch_size, "batch_size", 1, auto=8)  # "auto" would probe memory: a fixed default
        self.max_gen_toks = _whole(max_gen_toks, "max_gen_toks", 1)
        self.exact_tail = _whole(exact_tail, "exact_tail", 1)
        self.ratio = None if truncate_ratio is None else _number(truncate_ratio, "truncate_ratio", above=1.0)
        compute = {name: _compute_dtype(value, name) for name, value in
                   (("aux_dtype", aux_dtype), ("predictor_dtype", predictor_dtype))}
        if isinstance(pretrained, KVPredictionModel):
            self.model = pretrained
        else:
            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                if device is not None:  # lm-eval's default is cuda:0; like its hf model, run on the CPU instead
                    log.warning("device %s: this machine has no CUDA GPU; running on the CPU", device)
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if dtype not in (None, "auto") and dtype not in DTYPES:
                raise KVPredError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            torch_dtype = DTYPES.get(dtype) or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
            self.model = KVPredictionModel.from_pretrained(str(pretrained), dtype=torch_dtype, device=device)
        for name, value in compute.items():
            if value != "auto":
                setattr(self.model, name, value)
        self.tokenizer = self.model.tokenizer
        self.mode = mode
        self.add_bos_token = add_bos_token
        self.ratio = self.ratio or flop_ratio(self.model)["param_ratio"]

    # ------------------------------------------------------------ TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context becomes: BOS where there is one, as lm-eval's hf model
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.model.context_length

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's hf model encodes: None means the tokenizer's own default (a BOS first, for Llama's), or
        add_bos_token where given, and no second BOS before a text that starts with one."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
        return self.tokenizer(string, **special).input_ids

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        template = self.tokenizer.chat_template
        if not template:
            raise KVPredError(f"{self.tokenizer.name_or_path} has no chat template: leave out --apply_chat_template")
        return template if isinstance(template, str) else template[chat_template if isinstance(chat_template, str)
                                                                   else "default"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------ request types
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"kvpred loglikelihood ({self.mode})", disable=disable_tqdm)
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        with torch.inference_mode():
            for batch in score(self.model, pairs, self.mode, ratio=self.ratio, exact_tail=self.exact_tail,
                               batch_size=self.batch_size, progress=bar):
                for i, r in batch:
                    results[i] = (r["ll"], r["greedy"])
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc=f"kvpred generate_until ({self.mode})", disable=disable_tqdm)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            sizes = [kwargs.pop(key, None) for key in MAX_TOKENS_KEYS]
            max_new = int(next((size for size in sizes if size is not None), self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs.pop("do_sample", temperature > 0)) and temperature > 0
            if not do_sample:  # as lm-eval's hf model: greedy ignores the sampling settings
                for key in ("top_p", "top_k"):
                    kwargs.pop(key, None)
            prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in members]
            with torch.inference_mode():
                # what is left (top_k, repetition_penalty, ...) goes to generate, which passes what it does not
                # take itself to transformers' generate, as lm-eval's hf model does
                for batch in generate(self.model, prompts, self.mode, ratio=self.ratio, exact_tail=self.exact_tail,
                                      batch_size=self.batch_size, max_new_tokens=max_new, stop=until,
                                      do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                                      top_p=float(kwargs.pop("top_p", 1.0) or 1.0), progress=bar, **kwargs):
                    for j, tokens in batch:
                        text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
                        out[members[j]] = text
                        self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
        bar.close()
        return out  # type: ignore[return-value]


def _whole(value, name: str, least: int, auto: int | None = None) -> int:
    if auto is not None and str(value).startswith("auto"):
        return auto
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < least:
        raise KVPredError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def _number(value, name: str, above: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number > above or math.isinf(number):
        raise KVPredError(f"{name} must be a number above {above:g}, got {value!r}")
    return number


def _compute_dtype(value, name: str):
    """An aux_dtype / predictor_dtype argument (see KVPredictionModel's): "auto", "model" (the model's own
    dtype: None) or a dtype name."""
    if value == "auto":
        return value
    if value == "model":
        return None
    if value in DTYPES:
        return DTYPES[value]
    raise KVPredError(f"{name} must be auto, model or one of {', '.join(DTYPES)}, got {value!r}")


def register() -> None:
    """Register `kvpred` with lm-eval's model registry (idempotent; importing this module calls it)."""
    import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty)

    if "kvpred" not in MODEL_REGISTRY:  # `python -m` runs this file as __main__ and may import it again
        register_model("kvpred")(KVPredLM)


register()


def main() -> None:
    """`python -m kvpred.lm_eval_model ARGS`: lm-eval's command line with the kvpred model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
