"""KVPredictionModel: a frozen base, an auxiliary and a predictor, with exact / aux / predicted prefill (METHOD 1.2)."""
from __future__ import annotations

import copy
import inspect
import json
import os
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AttentionInterface, DynamicCache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from . import lora, models
from .models import (KVPredError, expert_count, hook_kv_projections, kv_widths, out_folder, remove_dead_temporaries,
                     sliding_window, temporary_name)
from .decoding import (MIN_TEMPERATURE, StepPool, capacity_bucket, check_decoding, decoding_entry, eos_id_list,
                       eos_token_ids, generate_with_steps, pad_id, with_stop_strings)
from .deferred import PendingValues, deferred_values
from .generation import chat_exact_tail
from .attention import capped_attention, soft_cap, use_kvpred_attention, warm_up_cudnn
from .matvec import use_blocked_matvec
from .predictor import KVPredictor, PredictorConfig
from .rope import KEY_NORM_AFTER_ROPE, adjacent_pairs, rope_runs, rotate_into, rotate_runs, rotated_layers

MODES = ("exact", "aux", "predicted")
FORMAT_VERSION = 1
CONFIG_NAME = "kvpred_config.json"
PREDICTOR_NAME = "predictor.safetensors"
AUX_NAME = "aux.safetensors"
DEFAULTS_DIR = Path(__file__).parent / "defaults"
DEFAULT_KEEP_RATIO = 0.25


@dataclass
class AuxSpec:
    kind: str  # "pruned" (KVP-LP: retained base layers) or "separate" (KVP-C: its own model)
    keep_layers: list[int] | None = None  # pruned: base layers the auxiliary keeps
    name_or_path: str | None = None  # separate: where the auxiliary loads from
    fingerprint: str | None = None  # separate: models.fingerprint of that auxiliary as loaded from there
    saved_params: list[str] = field(default_factory=list)  # aux tensors stored in aux.safetensors (the trained ones)


@dataclass
class KVPConfig:
    base: str  # how the base loads: alias, HF folder, hub id or GGUF file
    base_fingerprint: str  # models.fingerprint of the base this predictor was made for
    aux: AuxSpec
    predictor: PredictorConfig
    format_version: int = FORMAT_VERSION
    refine_thresholds: dict | None = None  # refine.Thresholds fields from `kvpred calibrate`; None: the defaults
    chat_exact_tail: int | None = None  # exact tail of chat prompts, measured for these weights; None: the
    # template's reply opening (generation.chat_exact_tail), the safe choice for a predictor never trained on chats
    weights_sha256: dict[str, str] | None = None  # file -> digest of the weights files saved with this config

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def forget_measurements(self) -> None:
        """Drop what was measured for the old weights (refinement thresholds, chat tail) when new ones replace them."""
        self.refine_thresholds = self.chat_exact_tail = None

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "KVPConfig":
        try:
            raw = json.loads(text)
        except ValueError as err:  # not JSON, or not text
            raise KVPredError(f"{where} is not a valid kvpred config ({type(err).__name__}: {err})") from err
        if not isinstance(raw, dict):
            raise KVPredError(f"{where} is not a valid kvpred config: it holds a JSON {type(raw).__name__}, not an "
                              "object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise KVPredError(f"{where} has format_version {version!r}; this kvpred reads version {FORMAT_VERSION}"
                              + (": a newer kvpred wrote it, upgrade kvpred to load it" if newer else ""))
        try:
            tail = raw.get("chat_exact_tail")
            if tail is not None and not (type(tail) is int and tail >= 1):
                raise ValueError(f"chat_exact_tail must be a positive integer or null, got {tail!r}")
            if raw.get("refine_thresholds") is not None:  # checked now, not at the first request that refines
                from .refine import Thresholds

                try:
                    Thresholds(**raw["refine_thresholds"])
                except KVPredError as err:
                    raise ValueError(f"refine_thresholds: {err}") from err
            if not (isinstance(raw["base"], str) and isinstance(raw["base_fingerprint"], str)):
                raise ValueError(f"base and base_fingerprint must be strings, got {raw['base']!r} and "
                                 f"{raw['base_fingerprint']!r}")
            digests = raw.get("weights_sha256")
            if digests is not None and not (isinstance(digests, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
                raise ValueError(f"weights_sha256 must map file names to digests, got {digests!r}")
            return cls(base=raw["base"], base_fingerprint=raw["base_fingerprint"], aux=_known(AuxSpec, raw["aux"]),
                       predictor=_known(PredictorConfig, raw["predictor"]), format_version=raw["format_version"],
                       refine_thresholds=raw.get("refine_thresholds"), chat_exact_tail=tail, weights_sha256=digests)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise KVPredError(f"{where} is not a valid kvpred config ({type(err).__name__}: {err})") from err


def _known(kind: type, fields_given: dict):
    """Dataclass `kind` from a config section, ignoring fields it does not know (as the top level does): a later
    kvpred may add optional ones."""
    if not isinstance(fields_given, dict):
        raise TypeError(f"{kind.__name__} must be a JSON object, got {fields_given!r}")
    return kind(**{name: value for name, value in fields_given.items() if name in kind.__dataclass_fields__})


# What `kvpred fit`, `compress` and `calibrate` write beside the checkpoint they save
REPORT_NAMES = ("fit_report.json", "compress_report.json", "calibration.json")


def check_checkpoint_out(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Where a checkpoint may be saved: an output folder (`out_folder`), not a Hugging Face model's (the base's, say),
    nor, unless `overwrite`, one holding a kvpred checkpoint already. Commands that save one check this before their
    work (with their --overwrite flag), `save_pretrained` again (which replaces a checkpoint, as transformers' does)."""
    out = out_folder(path, "the checkpoint", make=False)
    if (out / "config.json").is_file():
        raise KVPredError(f"{out} holds a Hugging Face model (config.json): save the checkpoint to its own folder")
    if not overwrite and (out / CONFIG_NAME).is_file():
        raise KVPredError(f"{out} already holds a kvpred checkpoint: choose another folder, or pass --overwrite to "
                          "replace it")
    return out


def write_report(out: str | os.PathLike, name: str, report: dict) -> None:
    """A command's JSON report beside the checkpoint it saved in `out`; another command's report there described the
    checkpoint this one replaced, so it goes."""
    for other in REPORT_NAMES:
        if other != name:
            Path(out, other).unlink(missing_ok=True)
    Path(out, name).write_text(json.dumps(report, indent=2))


GENERATION_DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


def generation_settings(config: GenerationConfig | None, prompt_length: int, max_length: int | None,
                        **given) -> dict:
    """`KVPredictionModel.generate`'s GENERATION_DEFAULTS settings: those given (not None), else `config`'s, else the
    defaults. Without max_new_tokens, a max_length (given, else the config's) counts the prompt too."""
    settings = {}
    for name, default in GENERATION_DEFAULTS.items():
        value = given[name] if given[name] is not None else getattr(config, name, None)
        settings[name] = default if value is None else value
    if given["max_new_tokens"] is None and (max_length is not None or getattr(config, "max_new_tokens", 0) is None):
        max_length = max_length if max_length is not None else config.max_length
        if max_length <= prompt_length:  # said in the caller's terms; max_new_tokens would be <= 0
            raise KVPredError(f"max_length {max_length} leaves no room for new tokens after a prompt of "
                              f"{prompt_length}: give a larger max_length, or max_new_tokens")
        settings["max_new_tokens"] = max_length - prompt_length
    return settings


def check_exact_tail(exact_tail: int) -> None:
    if exact_tail < 1:
        raise KVPredError(f"exact_tail must be >= 1 (the base always runs the last prompt token), got {exact_tail}")


def cache_kwargs(model: PreTrainedModel, cache) -> dict:
    """transformers renamed `past_key_values` to `cache` during 5.x; pass whichever this version takes."""
    return {"cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values": cache}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, as transformers' generate does for left-padded batches."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class Taps:
    """Tensors captured by forward hooks during one forward pass, per decoder layer."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hidden:
            hidden = torch.stack(self.hidden)
            return hidden, hidden
        return torch.stack(self.k), torch.stack(self.v)


@torch.no_grad()
def _k_norm_scale(norm: nn.Module) -> tuple[torch.Tensor, bool, float]:
    """A base k-norm as (scale, centred, eps): what it multiplies normalised keys by, and whether it subtracts their
    mean first: LayerNorms do (StableLM's, one per head; Cohere's, with a weight per head and dimension), RMS norms
    do not. An RMS norm's scale is read off its output for a vector of ones, whose RMS is 1: its weight, or 1 + its
    weight (Gemma 3)."""
    if hasattr(norm, "norms"):  # StableLM: a LayerNorm per head
        scales, _, eps = zip(*map(_k_norm_scale, norm.norms))
        return torch.stack(scales), True, eps[0]
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0))
    if isinstance(norm, nn.LayerNorm) or type(norm).__name__.endswith("LayerNorm"):
        if getattr(norm, "bias", None) is not None:
            raise KVPredError(f"the base's k-norm ({type(norm).__name__}) has a bias, which kvpred does not apply")
        return norm.weight.detach(), True, eps
    ones = torch.ones(norm.weight.shape[-1], device=norm.weight.device)
    return (norm(ones).float() * (1.0 + eps) ** 0.5).to(norm.weight.dtype), False, eps


def hidden_tap(model: PreTrainedModel, layer: int) -> nn.Module:
    """The module whose output is what decoder layer `layer` projects its keys and values from (a "hidden" tap):
    the layer's input norm (Apertus calls it attention_layernorm); in post-norm layers, which have none (OLMo 2),
    the module before the layer, whose output is its input; past the last layer, the final norm."""
    layers = model.model.layers
    if layer == len(layers):
        return model.model.norm
    for name in ("input_layernorm", "attention_layernorm"):
        if hasattr(layers[layer], name):
            return getattr(layers[layer], name)
    return layers[layer - 1] if layer else model.model.embed_tokens


def hidden_output(output) -> torch.Tensor:
    """A hidden tap's output as a tensor (older transformers' decoder layers return tuples)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(model: PreTrainedModel, source: str) -> Iterator[Taps]:
    """Hook `model`'s layers to capture, per layer, projected keys and values ("kv": keys before k-norm and RoPE,
    the position-free space the predictor works in) or the normed layer inputs plus the final norm ("hidden")."""
    taps, hooks = Taps(), []

    def keep(into: list):
        return lambda module, args, output: into.append(hidden_output(output))

    for i, layer in enumerate(model.model.layers):
        if source == "hidden":
            hooks.append(hidden_tap(model, i).register_forward_hook(keep(taps.hidden)))
        else:
            hooks += hook_kv_projections(layer.self_attn, lambda k, v: (taps.k.append(k), taps.v.append(v)))
    if source == "hidden":
        hooks.append(hidden_tap(model, len(model.model.layers)).register_forward_hook(keep(taps.hidden)))
    try:
        yield taps
    finally:
        for hook in hooks:
            hook.remove()


class KVPredictionModel(nn.Module):
    # What the predictor's matmuls, and the auxiliary's prefill, run in at inference: "auto", None (the model's
    # dtype) or a dtype; see `predictor_compute_dtype` and `aux_compute_dtype`. Set on an instance, or on the class
    # to cover every model (as the tests do).
    predictor_dtype: torch.dtype | None | str = "auto"
    aux_dtype: torch.dtype | None | str = "auto"
    # On a GPU, run predicted mode's first step tap by tap behind the auxiliary (kvpred.pipeline) in `generate`:
    # 4-19% lower TTFT there on an H200 (benchmarks/results/h200/pipeline), same logits up to rounding.
    pipelined_first_step: bool = True
    # On a GPU, replay unpadded prompt passes of up to 4096 tokens (batch x length; 1024 before transformers 5.18) as
    # CUDA graphs in `generate`, once a shape's step is captured (kvpred.prefill_graphs): short prefills there wait on
    # the host otherwise.
    prefill_graphs: bool = True

    def __init__(self, base: PreTrainedModel, aux: PreTrainedModel, predictor: KVPredictor, tokenizer,
                 config: KVPConfig):
        super().__init__()
        self.base, self.aux, self.predictor, self.tokenizer, self.config = base, aux, predictor, tokenizer, config
        for model in (base, aux):
            use_kvpred_attention(model)  # faster one-query steps on a CPU and long masked prefills on a GPU
            if base.device.type == "cpu":  # one-token steps stream the weights 2-3x faster (kvpred.matvec)
                use_blocked_matvec(model)
        # Trained aux tensors as saved (full tensors, or low-rank adapter factors already merged into `aux`)
        self.aux_tensors: dict[str, torch.Tensor] = {}
        self._compiled_write: Callable | None = None  # see compile_predictor
        self.compiled_step: Callable | None = None  # see compile_step
        self._steps = StepPool()  # generate's caches and CUDA-graph steps, per batch size and capacity
        attn = base.model.layers[0].self_attn
        self.base_kv_heads = base.config.num_key_value_heads
        self.base_head_dim = attn.head_dim
        # Base k-norm, stacked over layers so it applies to all predicted keys at once: over each head, with one
        # weight for all (Qwen3) or one per head (StableLM, Cohere), or over the whole projection (OLMo 2); before
        # RoPE, or after it (Hunyuan)
        norm_name = next((n for n in ("k_norm", "k_layernorm", "key_layernorm") if getattr(attn, n, None) is not None),
                         None)
        self.k_norm_after_rope = base.config.model_type in KEY_NORM_AFTER_ROPE
        scales, centred, eps = zip(*[_k_norm_scale(getattr(layer.self_attn, norm_name))
                                     for layer in base.model.layers]) if norm_name else [[None], [False], [0.0]]
        self.k_norm_centred, self.k_norm_eps = centred[0], eps[0]
        # [L, head_dim], [L, kv_heads, head_dim] or [L, kv_heads * head_dim]
        self.register_buffer("k_norm_weight", torch.stack(scales) if norm_name else None, persistent=False)
        self.base_rotated = rotated_layers(base.config)  # per base layer: False for SmolLM3's NoPE layers
        self.base_adjacent = adjacent_pairs(base.config)  # RoPE turns dimensions 2i and 2i + 1 together (GLM)
        self.base_window = sliding_window(base.config)  # None for full attention in every layer

    @property
    def predictor_compute_dtype(self) -> torch.dtype | None:
        """The dtype inference runs the predictor's matmuls in (None: the model's). `predictor_dtype` "auto" picks
        bf16 for an fp32 model on a CPU with bf16 dot products, where SmolLM2's predictor then takes 2x less time;
        that moves the keys by 0.2% (relative L2), far inside the prediction's own error."""
        return self._compute_dtype(self.predictor_dtype, "predictor_dtype")

    @property
    def aux_compute_dtype(self) -> torch.dtype | None:
        """The dtype the auxiliary's prefill runs its matmuls in, by autocast (None: the model's). `aux_dtype`
        "auto" picks bf16 where `predictor_dtype` does: there SmolLM2's auxiliary takes 2.1x less time over 1023
        tokens (146 -> 68 ms), and the hidden states the predictor reads move by 0.7% (relative L2)."""
        return self._compute_dtype(self.aux_dtype, "aux_dtype")

    def _compute_dtype(self, value: torch.dtype | None | str, name: str) -> torch.dtype | None:
        if value != "auto":
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise KVPredError(f"{name} must be 'auto', None (the model's dtype) or a floating-point torch dtype, "
                                  f"got {value!r}")
            if value == self.base.dtype:
                return None
            if name == "aux_dtype" and value not in (None, torch.bfloat16, torch.float16):  # autocast ignores others
                raise KVPredError(f"aux_dtype {value} cannot run the auxiliary: it runs by autocast, which takes "
                                  f"bfloat16 or float16 (or None, the model's {self.base.dtype})")
            return value
        # Native bf16 dot products only: oneDNN also "supports" bf16 on plain AVX512, by emulation, which need not
        # be faster.
        fast = (self.base.device.type == "cpu" and self.base.dtype == torch.float32
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        return torch.bfloat16 if fast else None

    def _prefill_autocast(self, mode: str):
        """The context a prefill of `mode` runs in: for the auxiliary ("aux", also under predicted mode's
        predictor inputs) autocast to `aux_compute_dtype` where it is set; else nothing."""
        dtype = self.aux_compute_dtype if mode == "aux" else None
        # no cache of cast weights: a CUDA graph cannot capture with one, and a forward casts each weight once
        return nullcontext() if dtype is None else torch.autocast(self.aux.device.type, dtype=dtype,
                                                                 cache_enabled=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, aux: str | None = None, keep_ratio: float | None = None,
                        keep_layers: list[int] | None = None, layer_map: list[int] | None = None,
                        source: str | None = None, base: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "KVPredictionModel":
        """Load a kvpred checkpoint folder, an embedded default (e.g. "smollm2-135m"), or build a new model
        around a base (HF folder, hub id, GGUF file or alias) with a pruned (`keep_ratio` / `keep_layers`) or
        separate (`aux`) auxiliary and an identity-initialised (pruned) or default-initialised predictor."""
        if device is not None:
            models.check_device(device)
        name_or_path = os.path.expanduser(os.fspath(name_or_path))
        given = {"aux": aux, "keep ratio": keep_ratio, "keep layers": keep_layers, "layer map": layer_map,
                 "source": source}
        building = [name for name, value in given.items() if value is not None]
        checkpoint = Path(name_or_path)
        if not (checkpoint / CONFIG_NAME).is_file() and not building:
            embedded = DEFAULTS_DIR / name_or_path
            checkpoint = embedded if (embedded / CONFIG_NAME).is_file() else checkpoint
        if (checkpoint / CONFIG_NAME).is_file():
            if building:
                base_name = KVPConfig.from_json((checkpoint / CONFIG_NAME).read_bytes(),
                                                str(checkpoint / CONFIG_NAME)).base
                raise KVPredError(f"{name_or_path!r} is already a kvpred checkpoint with its own auxiliary and "
                                  f"predictor, but the {' / '.join(building)} given builds new ones around a base "
                                  f"model: leave {'it' if len(building) == 1 else 'them'} out to use the checkpoint, "
                                  f"or give its base ({base_name}) to start over")
            return cls._load_checkpoint(checkpoint, base=base, dtype=dtype, device=device)
        return cls.build(name_or_path, aux=aux, keep_ratio=keep_ratio, keep_layers=keep_layers,
                         layer_map=layer_map, source=source or "kv", dtype=dtype, device=device)

    @classmethod
    def build(cls, base_name: str, *, aux: str | None = None, keep_ratio: float | None = None,
              keep_layers: list[int] | None = None, layer_map: list[int] | None = None, source: str = "kv",
              dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "KVPredictionModel":
        base, tokenizer = models.load_causal_lm(base_name, dtype, device)
        spec = _aux_spec(base, aux, keep_ratio, keep_layers)
        aux_model = _make_aux(base, tokenizer, spec, dtype, device)
        if spec.kind == "separate":
            spec.fingerprint = models.fingerprint(aux_model)
        if layer_map is None:
            layer_map = default_layer_map(base, aux_model, spec, source)
        pconf = _predictor_config(base, aux_model, layer_map, source)
        predictor = KVPredictor(pconf)
        if spec.kind == "pruned" and source == "kv":
            predictor.set_identity()
        config = KVPConfig(base=models.stored_name(base_name), base_fingerprint=models.fingerprint(base), aux=spec,
                           predictor=pconf)
        return cls(base, aux_model, predictor.to(base.device, base.dtype), tokenizer, config)

    @classmethod
    def _load_checkpoint(cls, path: Path, *, base: str | None, dtype, device) -> "KVPredictionModel":
        config = KVPConfig.from_json((path / CONFIG_NAME).read_bytes(), str(path / CONFIG_NAME))
        for name, digest in (config.weights_sha256 or {}).items():  # a set of files from one save, not two
            if (path / name).is_file() and models.files_digest([("", path / name)]) != digest:
                raise KVPredError(f"checkpoint {path} is half-written (a save stopped part-way?): {name} is not the "
                                  f"file its {CONFIG_NAME} was saved with")
        config.base = _beside(path, config.base)
        if config.aux.kind == "separate":
            config.aux.name_or_path = _beside(path, config.aux.name_or_path)
        if base is None:
            models.check_recorded_model_exists(config.base, path, '"base"',
                                               ", or in Python pass KVPredictionModel.from_pretrained(..., base=NEW)")
        base_model, tokenizer = models.load_causal_lm(base or config.base, dtype, device)
        if not models.same_model(base_model, config.base_fingerprint):
            raise KVPredError(f"checkpoint {path} was trained for base {config.base!r} (fingerprint "
                              f"{config.base_fingerprint}), but the base loaded from {base or config.base!r} has "
                              f"fingerprint {models.fingerprint(base_model)}: the predictor would produce wrong keys "
                              "and values for it")
        if base is not None:  # the base's new location, checked above, is what a later save records
            config.base = models.stored_name(base)
        if config.aux.kind == "separate":
            models.check_recorded_model_exists(config.aux.name_or_path, path, '"aux": "name_or_path"', "")
        aux_model = _make_aux(base_model, tokenizer, config.aux, dtype, device)
        if config.aux.fingerprint is not None and not models.same_model(aux_model, config.aux.fingerprint):
            raise KVPredError(f"checkpoint {path} was trained with the auxiliary {config.aux.name_or_path!r} "
                              f"(fingerprint {config.aux.fingerprint}), but what loads from there now has fingerprint "
                              f"{models.fingerprint(aux_model)}: its weights changed, and the predictor would produce "
                              "wrong keys and values from it")
        outside = [n for n in config.aux.saved_params if not n.startswith("model.layers.")]
        if config.aux.kind == "pruned" and outside:  # they would overwrite the base's own (models.prune_layers)
            raise KVPredError(f"checkpoint {path} saves auxiliary tensors outside its decoder layers ({outside[:3]}), "
                              "which a pruned auxiliary shares with the base; kvpred trains only decoder layers")
        aux_tensors = _read_safetensors(path / AUX_NAME) if config.aux.saved_params else {}
        _load_aux_tensors(aux_model, aux_tensors, config.aux.saved_params, path / AUX_NAME)
        expected = _predictor_config(base_model, aux_model, config.predictor.layer_map, config.predictor.source,
                                     config.predictor.rank)
        if expected != config.predictor:
            raise KVPredError(f"{path / CONFIG_NAME}: predictor shapes {config.predictor} do not match the "
                              f"base and auxiliary, which need {expected}")
        predictor = KVPredictor(config.predictor)
        _load_into(predictor, _read_safetensors(path / PREDICTOR_NAME), None, path / PREDICTOR_NAME)
        model = cls(base_model, aux_model, predictor.to(base_model.device, base_model.dtype), tokenizer, config)
        model.aux_tensors = aux_tensors
        return model

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write config JSON + predictor safetensors (+ `aux_tensors`, the trained aux tensors); `dtype` (e.g.
        bfloat16, to ship a small default) converts the stored tensors. Every file is written under a temporary
        name first and renamed into place, the config last; the config holds the weights files' digests, so a
        folder a killed save left with files of two saves is refused when it loads, not used."""
        path = check_checkpoint_out(path)
        path.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path)  # weights files of a save that was killed
        self.config.aux.saved_params = sorted(self.aux_tensors)
        files = {PREDICTOR_NAME: self.predictor.state_dict()} | ({AUX_NAME: self.aux_tensors} if self.aux_tensors
                                                                 else {})
        staged = {name: temporary_name(path / name) for name in files}
        try:
            for name, tensors in files.items():
                save_file({k: v.detach().to(dtype or v.dtype).contiguous().cpu().clone() for k, v in tensors.items()},
                          str(staged[name]), metadata={"format": "pt"})
            self.config.weights_sha256 = {name: models.files_digest([("", tmp)]) for name, tmp in staged.items()}
            for name, tmp in staged.items():
                os.replace(tmp, path / name)
            _atomic(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(self.config.to_json()))
            if AUX_NAME not in files:  # an earlier save's, in a folder this one replaced
                (path / AUX_NAME).unlink(missing_ok=True)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)

    def _apply(self, fn, *args, **kwargs):
        """nn.Module's casts and moves (`to`, `half`, `cuda`...) make new parameter tensors: the pooled caches and
        captured steps were made for the old ones, so they go. RoPE's inverse frequencies stay float32, as
        from_pretrained(dtype=...) leaves them: rounded to bf16 they turn the angles of later positions."""
        self._steps.clear()
        rope = {(module, name): buffer for module in self.modules() for name, buffer in module.named_buffers(
            recurse=False) if name.endswith("inv_freq") and buffer.dtype == torch.float32}
        out = super()._apply(fn, *args, **kwargs)
        for (module, name), buffer in rope.items():
            setattr(module, name, buffer.to(getattr(module, name).device))
        return out

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def common_vocab(self) -> int:
        """Token ids below this every mode reads: a KVP-C auxiliary's embedding table may be the smaller one (the
        base's extra rows are its padding)."""
        return min(self.base.config.vocab_size, self.aux.get_input_embeddings().num_embeddings)

    @property
    def context_length(self) -> int:
        """The longest prompt + new tokens accepted: the base's and auxiliary's position limits. (A sliding-window
        model's layers see their window: kvpred's caches keep every column, and its captured steps mask those
        outside a sliding layer's window.)"""
        return min(self._context_limits())

    @property
    def context_limit_reason(self) -> str:
        """What sets `context_length`, in words."""
        return self._context_limits()[self.context_length]

    def _context_limits(self) -> dict[int, str]:
        """Each limit `context_length` takes the least of -> what it is (the first such, where two are equal)."""
        limits: dict[int, str] = {}
        for limit, what in [(self.base.config.max_position_embeddings, "the base's position limit"),
                            (self.aux.config.max_position_embeddings, "the auxiliary's position limit")]:
            limits.setdefault(limit, what)
        return limits

    @property
    def chat_tail(self) -> int:
        """The exact tail of chat prompts that ask for none: the checkpoint's own (measured for its weights), else
        the chat template's tokens that open the reply."""
        return self.config.chat_exact_tail or chat_exact_tail(self.tokenizer)

    # ---------------------------------------------------------------- phases
    def aux_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, past: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the auxiliary backbone (no LM head) and collect the predictor's inputs per tap.

        Returns key_in, value_in: [taps, B, T, in]: per aux layer its K and V projections ("kv"), or its normed
        input plus the final normed state ("hidden"), as `capture` takes them in training. A mask and positions
        of None mean an unpadded batch (no host-device syncs for padding checks). With `past` (the auxiliary's own
        cache of the tokens before `input_ids`, as a chat session keeps it), `input_ids` attend to it and are added
        to it; the layers past the last tap never run, so their cache stays empty.
        """
        with capture(self.aux, self.config.predictor.source) as taps:
            self.run_aux(input_ids, attention_mask, position_ids, past)
        key_in, value_in = taps.stacked()
        return key_in.to(self.aux.dtype), value_in.to(self.aux.dtype)  # autocast may leave them in its dtype

    def run_aux(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, past: Cache | None = None) -> None:
        """The auxiliary backbone as `aux_inputs` runs it, up to its last tap; hooks the caller installed first see
        what it computes (kvpred.pipeline takes the taps one by one that way)."""
        with self._stop_after_last_tap(), self._prefill_autocast("aux"):
            try:
                self.aux.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=past is not None, **cache_kwargs(self.aux.model, past))
            except _TapsComplete:
                pass

    @contextmanager
    def _stop_after_last_tap(self) -> Iterator[None]:
        """End the auxiliary's pass at the last tap the predictor reads: with "kv" input once its last layer has
        projected keys and values (that layer's attention, its MLP and the final norm feed nothing the predictor
        reads); with "hidden" input at the normed input of the deepest layer the layer map names, so layers
        past it (kept only for the auxiliary's own LM head) are skipped. Registered after the taps, so the last
        taps are taken before `_TapsComplete` is raised."""
        layers = self.aux.model.layers

        def complete(*args):
            raise _TapsComplete

        if self.config.predictor.source == "hidden":
            last = max(self.config.predictor.layer_map)
            hooks = [hidden_tap(self.aux, last).register_forward_hook(complete)] if last < len(layers) else []
        else:
            hooks = hook_kv_projections(layers[-1].self_attn, complete)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def base_kv(self, keys: torch.Tensor, values: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted [L, B, T, kv_heads*head_dim] -> cache layout [L, B, kv_heads, T, head_dim], keys normed
        with the base's k-norm (where it has one) and rotated with the base's RoPE at the first T of `position_ids`
        [B, >= T], the positions of the forward they open (see `rope_runs`)."""
        n_layers, b, t, _ = keys.shape
        keys = keys.view(n_layers, b, t, self.base_kv_heads, self.base_head_dim)  # [L, B, T, H, D]
        keys = keys if self.k_norm_after_rope else self._k_norm(keys)
        keys = keys.transpose(2, 3)  # [L, B, H, T, D]
        values = values.view(n_layers, b, t, self.base_kv_heads, -1).transpose(2, 3)  # [L, B, H, T, Dv]
        rotated = rotate_runs(keys, rope_runs(self.base, position_ids, keys.dtype, t), self.base_adjacent)
        for i in self._unrotated(slice(None)):
            rotated[i] = keys[i]
        return (self._k_norm(rotated) if self.k_norm_after_rope else rotated), values

    def _unrotated(self, layers: slice) -> list[int]:
        """Indices within base `layers` of the layers whose keys are cached unrotated (SmolLM3's NoPE layers)."""
        return [i for i, rotated in enumerate(self.base_rotated[layers]) if not rotated]

    def _k_norm(self, keys: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """The base's k-norm on [L, B, T, H, D] keys of base `layers` (or [L, B, H, T, D], where the norm has one
        weight for all heads); identity for bases without one."""
        if self.k_norm_weight is None:
            return keys
        weight = self.k_norm_weight[layers]
        shape = keys.shape
        if weight.shape[-1] != shape[-1]:  # over all heads: normalise [L, B, T, H * D]
            keys = keys.flatten(-2)
        x = keys.float()
        if self.k_norm_centred:
            x = x - x.mean(-1, keepdim=True)
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.k_norm_eps)).to(keys.dtype)
        # weight [L, *S] against normed [L, B, T, ..., S]
        return (weight.view(shape[0], *[1] * (normed.dim() - weight.dim()), *weight.shape[1:]) * normed).view(shape)

    @torch.no_grad()
    def base_kv_into(self, keys: torch.Tensor, values: torch.Tensor | None,
                     rope: list[tuple[slice, torch.Tensor, torch.Tensor]], key_out: torch.Tensor,
                     value_out: torch.Tensor, layers: slice = slice(None)) -> None:
        """`base_kv` for inference, written into `key_out`, `value_out` [L, B, H, T, D] (e.g. a BufferCache's
        arena): values (unless None) in one strided copy, keys rotated straight into the output (out= ops).
        `rope`: the base's tables at the T columns, per run of base layers (`rope_runs`); `layers`: which base
        layers the L are (all of them by default)."""
        n_layers, b, t, _ = keys.shape
        keys = keys.to(key_out.dtype)  # before RoPE: mixed-dtype elementwise ops are several times slower on a CPU
        keys = keys.view(n_layers, b, t, self.base_kv_heads, self.base_head_dim)
        keys = keys if self.k_norm_after_rope else self._k_norm(keys, layers)
        keys = keys.transpose(2, 3)  # [L, B, H, T, D]
        first = layers.start or 0
        for run, cos, sin in rope:  # the runs' layers within `layers`, numbered from its first
            mine = slice(max(run.start, first) - first, min(run.stop, first + n_layers) - first)
            if mine.start < mine.stop:
                rotate_into(keys[mine], cos, sin, key_out[mine], self.base_adjacent)
        for i in self._unrotated(layers):
            key_out[i].copy_(keys[i])
        if self.k_norm_after_rope:
            key_out.copy_(self._k_norm(key_out, layers))
        if values is not None:
            value_out.copy_(values.view(n_layers, b, t, self.base_kv_heads, -1).transpose(2, 3))

    def write_cache(self, keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
        """keys, values: [L, B, H, T, D] -> a transformers cache the base decodes from."""
        cache = DynamicCache(config=self.base.config)
        for i in range(keys.shape[0]):
            cache.update(keys[i], values[i], i)
        return cache

    @torch.no_grad()
    def predicted_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, exact_tail: int = 1,
                        defer_values: bool = False) -> DynamicCache:
        """Steps 1-2 of KV prediction: a base cache for all prompt tokens but the last `exact_tail`. With
        `defer_values`, the values are left to the base's first forwards (see `kvpred.deferred`): the cache's
        `pending_values` then says what they are, and it must be used inside `deferred_values`."""
        prefix = self._aux_prefix(input_ids, attention_mask, exact_tail)
        defer_values = defer_values and self.base_window is None  # a sliding layer's cache drops early columns
        if prefix is None:
            cache = DynamicCache(config=self.base.config)
            cache.pending_values = None
            return cache
        key_in, value_in, pos = prefix
        shape = (len(self.base.model.layers), pos.shape[0], self.base_kv_heads, key_in.shape[2])
        keys = torch.empty(*shape, self.base_head_dim, dtype=self.base.dtype, device=pos.device)
        values = torch.empty(*shape, self.predictor.config.value_features // self.base_kv_heads,
                             dtype=self.base.dtype, device=pos.device)
        value_inputs = self.predict_kv_into(key_in, value_in, pos, keys, values, defer_values=defer_values)
        cache = self.write_cache(keys, values)
        cache.pending_values = None if value_inputs is None else PendingValues(self.predictor, *value_inputs, cache,
                                                                               self.predictor_compute_dtype)
        return cache

    @torch.no_grad()
    def predict_kv_into(self, key_in: torch.Tensor, value_in: torch.Tensor, position_ids: torch.Tensor,
                        key_out: torch.Tensor, value_out: torch.Tensor, mark: Callable[[str], None] = lambda p: None,
                        defer_values: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Predictor then `base_kv_into` for the n columns of `key_in`, `value_in` [.., B, n, ..], the first of the
        forward whose `position_ids` [B, >= n] are given (see `rope_runs`). On the CPU over chunks of
        CPU_PREDICT_ROWS rows; `mark` as in `predict_into`, after each chunk's predictor and write. With
        `defer_values` only the keys are written, and what the value maps read is returned
        (KVPredictor.keys_and_value_inputs)."""
        n = key_in.shape[2]
        step = n if key_in.device.type != "cpu" else max(1, CPU_PREDICT_ROWS // position_ids.shape[0])
        runs = rope_runs(self.base, position_ids, key_out.dtype, n)  # once: its table may depend on all of them
        dtype = self.predictor_compute_dtype
        value_inputs = []
        for s in range(0, n, step):
            e = s + step
            if defer_values:
                keys, (inputs, index) = self.predictor.keys_and_value_inputs(key_in[:, :, s:e], value_in[:, :, s:e],
                                                                             dtype)
                values = None
                value_inputs.append(inputs.to(key_in.dtype))
            else:
                keys, values = self.predictor(key_in[:, :, s:e], value_in[:, :, s:e], dtype)  # [L, B, <=step, kv]
            mark("predictor")
            self.base_kv_into(keys, values, [(run, cos[..., s:e, :], sin[..., s:e, :]) for run, cos, sin in runs],
                              key_out[..., s:e, :], value_out[..., s:e, :])
            mark("write")
        if not defer_values:
            return None
        return (value_inputs[0] if len(value_inputs) == 1 else torch.cat(value_inputs, 2)), index

    def _aux_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    exact_tail: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The auxiliary over prompt[:-exact_tail]: the predictor's inputs, and the whole prompt's positions [B, N];
        None when that prefix is empty. A mask of None means an unpadded batch (no host-device syncs)."""
        n = input_ids.shape[1] - exact_tail
        if n <= 0:
            return None
        if attention_mask is None:
            key_in, value_in = self.aux_inputs(input_ids[:, :n], None, None)
            return key_in, value_in, torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        pos = position_ids_from_mask(attention_mask)
        key_in, value_in = self.aux_inputs(input_ids[:, :n], attention_mask[:, :n], pos[:, :n])
        return key_in, value_in, pos

    # ---------------------------------------------------------------- fast path
    def new_cache(self, batch_size: int, capacity: int, mode: str = "predicted") -> "BufferCache":
        """A preallocated cache for `prefill_into` and decoding: the auxiliary's in "aux" mode, else the base's."""
        model = self.aux if mode == "aux" else self.base
        return BufferCache(model.config, batch_size, capacity, dtype=model.dtype, device=model.device)

    def compile_step(self) -> None:
        """Run the base's one-token step (`kvpred.decoding.GraphStep`: predicted mode's first token, and every decode
        step in either mode) through a torch.compile'd base forward. Inductor fuses the norms, RoPE, SiLU and
        residual adds that make most of a small model's step: on an H100 (bf16) the CUDA-graph step takes 1.6 ms
        instead of 3.4 for SmolLM2-135M, 1.8 instead of 2.8 for Llama-3.2-1B and 7.1 instead of 9.2 for
        Llama-3.1-8B (benchmarks/results/h100/step_compile). Logits differ from the eager step's by bf16 rounding.
        On a CPU the step then runs with fixed shapes too (the whole cache under a mask), without a graph to
        capture; there the fused forward saves the eager step's per-op overhead instead (see benchmarks/results/
        cpu_compiled_step), and predicted mode's first step no longer defers its values (kvpred.deferred).

        Predicted mode's pipelined first step (kvpred.pipeline) compiles its parts the same way: on an H200 this took
        predicted mode's TTFT at batch 1 and 1024 tokens from 4.5 to 3.4 ms for Llama-3.2-1B and from 8.2 to 4.6 ms
        for Gemma 3 1B (benchmarks/results/h200/compiled_parts).

        Opt-in, like `compile_predictor`: each batch size and cache capacity compiles once when its step is first
        made, 20-45 s on the H100 and about a minute on a 2-core CPU (`warm_up` makes them up front)."""
        # Static shapes: dynamic ones took 110-135 s to compile and ran no faster. Each (batch, capacity) is one
        # entry of the forward, and one per part of the pipelined first step (one part per auxiliary tap: 4-12 for
        # the default maps), so let many more of them stay compiled than dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        # Round fused intermediates to the model's dtype as eager does: on SmolLM2 (bf16) this took the greedy
        # continuations equal to the eager step's from 56% to 61% (exact) and from 55% to 80% (predicted).
        torch._inductor.config.emulate_precision_casts = True
        self.compiled_step = torch.compile(self.base.forward, dynamic=False)  # a function, not a submodule
        self._steps.clear()  # steps made before this captured the uncompiled forward

    def compile_predictor(self, backend: str = "inductor") -> None:
        """Run `predict_into`'s predictor and cache write as one torch.compile'd function, so the RoPE, the layout
        changes and the copies fuse into fewer passes over the predicted K/V. On an H100 this takes the two 25-40%
        less time on their own, but moves TTFT at 8k-32k tokens by only -1% to +4%
        (benchmarks/results/h100/compile), so it is opt-in. The first prompts pay the compilation (seconds); shapes
        are dynamic, so new prompt lengths reuse it."""
        self._compiled_write = torch.compile(self._predict_write, dynamic=True, backend=backend)

    def _predict_write(self, key_in: torch.Tensor, value_in: torch.Tensor, position_ids: torch.Tensor,
                       key_out: torch.Tensor, value_out: torch.Tensor) -> None:
        keys, values = self.base_kv(*self.predictor(key_in, value_in), position_ids)
        key_out.copy_(keys)
        value_out.copy_(values)

    @torch.no_grad()
    def predict_into(self, cache: "BufferCache", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     exact_tail: int = 1, mark: Callable[[str], None] | None = None,
                     defer_values: bool = False) -> None:
        """`predicted_cache` written in place: the first N - exact_tail columns of `cache` (emptied first) get the
        predicted keys and values (with `defer_values`, the keys and `cache.pending_values`). `mark(phase)` is called
        after each phase ("aux", "predictor", "write"; after `compile_predictor` the two run as one function, all
        of it before the "predictor" mark). On the CPU they alternate over chunks of tokens, marking each time."""
        mark = mark or (lambda phase: None)
        cache.reset()
        prefix = self._aux_prefix(input_ids, attention_mask, exact_tail)
        mark("aux")
        if prefix is None:
            return
        key_in, value_in, pos = prefix
        n = key_in.shape[2]
        if self._compiled_write is not None and not defer_values:
            self._compiled_write(key_in, value_in, pos, *cache.slices(n))
            mark("predictor")
        else:
            value_inputs = self.predict_kv_into(key_in, value_in, pos, *cache.slices(n), mark, defer_values)
            if value_inputs is not None:
                cache.pending_values = PendingValues(self.predictor, *value_inputs, cache, self.predictor_compute_dtype)
        cache.set_length(n)
        mark("write")

    @torch.no_grad()
    def prefill_into(self, cache: "BufferCache", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     *, mode: str = "predicted", exact_tail: int = 1) -> torch.Tensor:
        """`prefill` on the fast path: fills a preallocated `cache` (from `new_cache(.., mode)`) in place and
        returns the logits [B, W, V] of the last W = exact_tail positions. Inputs are not validated (call
        `check_inputs` first); an attention_mask of None means an unpadded batch and avoids host-device syncs."""
        if input_ids.shape[1] > cache.capacity:
            raise KVPredError(f"prompt of {input_ids.shape[1]} tokens does not fit a cache of {cache.capacity}")
        if mode == "predicted":
            self.predict_into(cache, input_ids, attention_mask, exact_tail)
        else:
            cache.reset()
        past = cache.get_seq_length()
        pos = None if attention_mask is None else position_ids_from_mask(attention_mask)[:, past:]
        return self._prompt_logits(mode, input_ids[:, past:], attention_mask, pos, cache, exact_tail)

    def _prompt_logits(self, mode: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, cache, last: int | torch.Tensor) -> torch.Tensor:
        """The forward of `mode`'s model (the auxiliary in aux mode, else the base) over the prompt tokens not yet
        in `cache`, filling it: logits [B, W, V] of the `last` W positions (or of those `last` [W] indexes). The
        auxiliary alone runs its layers as predicted mode runs them (autocast, see `aux_compute_dtype`), but its LM
        head in its own dtype: bf16 logits are 0.06 apart at magnitude 8 and would shift log-likelihoods by that
        much, differently per batch."""
        model = self.aux if mode == "aux" else self.base
        args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    **cache_kwargs(model, cache), use_cache=True)
        if mode != "aux" or self.aux_compute_dtype is None:
            return model(**args, logits_to_keep=last).logits.to(model.dtype)
        with self._prefill_autocast(mode):
            hidden = model.base_model(**args).last_hidden_state
            hidden = hidden[:, last] if isinstance(last, torch.Tensor) else hidden[:, -last:]
        head = model.get_output_embeddings()
        return head(hidden.to(head.weight.dtype))

    @contextmanager
    def static_step(self, cache: "BufferCache", slot: torch.Tensor) -> Iterator[None]:
        """Inside, base forwards of Q tokens per row write at cache columns `slot` (a Q-element long tensor) and
        attend over the whole buffer under the caller's 4D bool mask [B, 1, Q, capacity]: fixed shapes and no
        host reads, as a CUDA graph needs. Pass that mask as attention_mask (transformers uses a 4D mask as is). The Q
        columns are consecutive and the same in every row, and each query's own column is the last one it sees
        (sliding layers measure their window back from it)."""
        AttentionInterface.register(STEP_ATTENTION, _step_attention)
        config = self.base.config
        previous = config._attn_implementation
        config._attn_implementation, cache.step_slot = STEP_ATTENTION, slot
        # transformers' grouped experts (its default) cannot be captured as a CUDA graph outside bf16 (torch 2.11);
        # its batched ones can. They copy each routed expert's weights per row: for one token, a few reads of them
        batched = bool(expert_count(config)) and slot.numel() == 1 and self.base.dtype != torch.bfloat16
        experts = config._experts_implementation if batched else None
        if batched:
            config._experts_implementation = "batched_mm"
        try:
            yield
        finally:
            config._attn_implementation, cache.step_slot = previous, None
            if batched:
                config._experts_implementation = experts

    # ---------------------------------------------------------------- inference
    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mode: str,
                     max_new_tokens: int = 0, exact_tail: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if mode not in MODES:
            raise KVPredError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        check_exact_tail(exact_tail)
        parts = {"base": self.base, "auxiliary": self.aux, "predictor": self.predictor.key_weight}
        if len({(part.device, part.dtype) for part in parts.values()}) > 1:  # one part moved or cast alone
            where = ", ".join(f"{name} {part.dtype} on {part.device}" for name, part in parts.items())
            raise KVPredError(f"the model's parts differ in device or dtype ({where}): move or cast the whole model, "
                              "model.to(...)")
        input_ids = torch.as_tensor(input_ids)  # checked where it is: on a CPU, no wait on the device
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise KVPredError(f"input_ids must be a non-empty [batch, length] tensor, got shape "
                              f"{tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise KVPredError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if attention_mask is None:  # as transformers infers it: pad ids are padding, where they are not also EOS
            pad = self.tokenizer.pad_token_id
            pads = pad is not None and pad not in eos_id_list(self)
            attention_mask = (input_ids != pad).long() if pads else torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
        if attention_mask.dim() == 1:  # a 1-D prompt's
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != input_ids.shape:
            raise KVPredError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids of "
                              f"shape {tuple(input_ids.shape)}")
        # one wait on the device for all the checks of the values, not one each (none for a prompt on the CPU)
        lengths = attention_mask.long().sum(-1)
        shortest, last, low, high = torch.stack([lengths.min(), attention_mask[:, -1].long().min(), input_ids.min(),
                                                 input_ids.max()]).tolist()
        if shortest == 0:
            raise KVPredError(f"empty prompt in batch rows {lengths.eq(0).nonzero().flatten().tolist()}")
        if last == 0:
            raise KVPredError("batches must be left-padded (tokenizer.padding_side = 'left'): every row's last "
                              "column must be a real token")
        vocab, whose = self.base.config.vocab_size, "base"
        if mode != "exact" and self.common_vocab < vocab:
            vocab, whose = self.common_vocab, "auxiliary"
        if low < 0 or high >= vocab:
            raise KVPredError(f"token ids must lie in [0, {vocab}) (the {whose}'s embedding rows), got {low}..{high}")
        longest = input_ids.shape[1] + max_new_tokens
        if longest > self.context_length:
            what = self.context_limit_reason
            why = "; kvpred runs only sequences the window covers" if "window" in what else ""
            raise KVPredError(f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
                              f"context limit of {self.context_length} tokens ({what}{why})")
        return input_ids.to(self.device), attention_mask.to(self.device)

    @decoding_entry
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 mode: str = "predicted", exact_tail: int = 1, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, stop_strings: list[str] | None = None, streamer=None,
                 defer_values: bool | None = None, transformers_loop: bool = False, **generate_kwargs) -> torch.Tensor:
        """Like transformers' generate: returns [B, prompt + new] token ids. Decoding is always the base's own
        (or, in "aux" mode, the auxiliary's); only the prompt's cache differs between modes.

        Settings not given come from a `generation_config` passed as in transformers, else kvpred's defaults
        (`GENERATION_DEFAULTS`: 32 new tokens, greedy; sampling with top_k 0, no cut, where transformers cuts at 50);
        `max_length` (prompt + new tokens) counts where `max_new_tokens` is not given. Modes "exact" and "predicted"
        decode with kvpred.decoding's loop on a preallocated cache, whose one-token step is a CUDA graph on a GPU; it
        takes `logits_processor` and `stopping_criteria` besides the arguments above. Aux mode,
        `transformers_loop=True`, a `generation_config` and any other transformers generate argument (beams, several
        sequences per prompt, penalties...) use transformers' generate instead. On a CPU predicted mode defers its
        values (kvpred.deferred; `defer_values`). None of this changes the tokens. The prompt may also be given as
        `inputs`, transformers' name."""
        inputs = generate_kwargs.pop("inputs", None)
        if (input_ids is None) == (inputs is None):
            raise KVPredError("give the prompt's token ids once, as input_ids (or inputs, as transformers names them)")
        input_ids = inputs if input_ids is None else input_ids
        given = generate_kwargs.pop("generation_config", None)
        length = torch.as_tensor(input_ids).shape[-1]
        settings = generation_settings(given, length, generate_kwargs.pop("max_length", None),
                                       max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                       top_p=top_p, top_k=top_k)
        max_new_tokens = settings["max_new_tokens"]
        input_ids, attention_mask = self.check_inputs(input_ids, attention_mask, mode, max_new_tokens, exact_tail)
        check_decoding(**settings)
        if mode == "predicted" and generate_kwargs.get("use_cache", True) is False:
            raise KVPredError("use_cache=False drops the cache that predicted mode fills: use mode='exact'")
        stop_strings = [s for s in stop_strings or [] if s] or None  # an empty one never matches (as in the server)
        defer = self.device.type == "cpu" if defer_values is None else defer_values
        tokenizer = generate_kwargs.pop("tokenizer", None) or self.tokenizer  # transformers' callers pass one
        if not transformers_loop and mode != "aux" and given is None and set(generate_kwargs) <= {
                "logits_processor", "stopping_criteria"}:
            criteria = with_stop_strings(generate_kwargs.get("stopping_criteria"), stop_strings, tokenizer)
            return generate_with_steps(
                self, input_ids, attention_mask, mode=mode, exact_tail=exact_tail, **settings,
                eos=eos_token_ids(self), pad_token_id=pad_id(self), streamer=streamer,
                logits_processor=generate_kwargs.get("logits_processor"), stopping_criteria=criteria,
                defer_values=defer, pool=self._steps)
        config = copy.deepcopy(given) if given is not None else GenerationConfig()
        if config.eos_token_id is None:
            config.eos_token_id = eos_id_list(self) or None
        if config.pad_token_id is None:
            config.pad_token_id = pad_id(self)
        sampling = settings["do_sample"]
        config.update(max_new_tokens=max_new_tokens, do_sample=sampling, stop_strings=stop_strings,
                      temperature=max(settings["temperature"], MIN_TEMPERATURE) if sampling else None,
                      top_p=settings["top_p"] if sampling else None, top_k=settings["top_k"] if sampling else None)
        model_kwargs = config.update(**generate_kwargs)  # generation settings go into the config, as in transformers
        model = self.aux if mode == "aux" else self.base
        copies = max(config.num_beams or 1, config.num_return_sequences or 1)  # rows per prompt: beams or samples
        cache = None
        if mode == "predicted":
            cache = self.predicted_cache(input_ids, attention_mask, exact_tail, defer_values=defer and copies == 1)
            if copies > 1:  # transformers repeats the prompt's rows, not a cache it was given
                cache.batch_repeat_interleave(copies)
        with deferred_values(model, getattr(cache, "pending_values", None)), _token_ids_only(model):
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(model, cache),
                                  generation_config=config, streamer=streamer, tokenizer=tokenizer, **model_kwargs)

    @torch.no_grad()
    def warm_up(self, capacities: Iterable[int] = (256, 512, 1024, 2048), batch_size: int = 1) -> list[int]:
        """Get `generate` ready for requests of `batch_size` rows: for each capacity (rounded up to the pool's
        buckets, capped at the context length; at most as many as the pool keeps, the smallest first) the pooled
        cache and, on a GPU, its CUDA-graph step and pipelined first step (`pipelined_first_step`; after
        `compile_step`, on a CPU too, its compiled step), and each mode's kernels once. The first request of each
        shape then pays no allocation, graph capture or lazy initialisation, and on a GPU cuDNN's attention is
        started (`kvpred.attention`) (`kvpred serve` does this before it takes requests). Returns the capacities
        made ready."""
        context = self.context_length
        buckets = sorted({capacity_bucket(min(c, context), context) for c in capacities})[:self._steps.size]
        if self.device.type == "cuda":  # long masked prefills (sliding windows, padded batches) run on cuDNN
            warm_up_cudnn(self.device, self.base.dtype)
        for i, capacity in enumerate(buckets):
            n = capacity - 2  # + 2 new tokens: the step is captured after the first
            ids = torch.arange(n, device=self.device).remainder(self.base.config.vocab_size).expand(batch_size, n)
            modes = MODES if i == 0 else ("predicted",)  # per shape, modes share the pooled cache and step
            if i > 0 and self.device.type == "cuda" and self.pipelined_first_step:
                modes += ("predicted",)  # the first captures the step, then the pipeline and pass; the second runs them
            for mode in modes:
                self.generate(ids, mode=mode, max_new_tokens=2)
        return buckets

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                mode: str = "predicted", exact_tail: int = 1) -> tuple[torch.Tensor, DynamicCache]:
        """The whole prompt pass: logits of the last `exact_tail` positions [B, W, V] and the cache of the prompt.
        In predicted mode the base computes those W positions over the predicted cache of the rest."""
        input_ids, attention_mask = self.check_inputs(input_ids, attention_mask, mode, 0, exact_tail)
        cache = (self.predicted_cache(input_ids, attention_mask, exact_tail) if mode == "predicted"
                 else DynamicCache(config=(self.aux if mode == "aux" else self.base).config))
        past = cache.get_seq_length()
        pos = position_ids_from_mask(attention_mask)[:, past:]
        return self._prompt_logits(mode, input_ids[:, past:], attention_mask, pos, cache, exact_tail), cache


# -------------------------------------------------------------------- helpers
@contextmanager
def _token_ids_only(model: PreTrainedModel) -> Iterator[None]:
    """Inside, `model`'s generation config holds only its special token ids. transformers' generate fills what a
    call leaves unset from it (a repetition penalty, say), which kvpred's own loop does not read: the two loops would
    give different tokens for one call. Settings come from the call, or a generation_config passed to it."""
    own = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id,
                                               pad_token_id=own.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = own


def _aux_spec(base: PreTrainedModel, aux: str | None, keep_ratio: float | None,
              keep_layers: list[int] | None) -> AuxSpec:
    if aux is not None:
        if keep_ratio is not None or keep_layers is not None:
            raise KVPredError("choose either a separate auxiliary (aux) or a pruned one (keep_ratio/keep_layers)")
        return AuxSpec(kind="separate", name_or_path=models.stored_name(aux))
    if keep_ratio is not None and keep_layers is not None:
        raise KVPredError("give the pruned auxiliary's keep_ratio or its keep_layers, not both")
    if keep_layers is None:
        n = base.config.num_hidden_layers
        keep_layers = models.keep_layers_for_ratio(n, DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio)
    return AuxSpec(kind="pruned", keep_layers=list(keep_layers))


def _make_aux(base: PreTrainedModel, tokenizer, spec: AuxSpec, dtype, device) -> PreTrainedModel:
    if spec.kind == "pruned":
        return models.prune_layers(base, spec.keep_layers)
    if spec.kind != "separate" or not spec.name_or_path:
        raise KVPredError(f"unknown auxiliary spec {spec}; kind must be 'pruned' or 'separate'")
    try:
        aux, aux_tokenizer = models.load_causal_lm(spec.name_or_path, dtype or base.dtype, device or base.device)
    except KVPredError as err:
        raise KVPredError(f"the separate auxiliary cannot be loaded: {err}") from err
    models.check_same_tokenizer(tokenizer, aux_tokenizer, spec.name_or_path)
    return aux


def default_layer_map(base: PreTrainedModel, aux: PreTrainedModel, spec: AuxSpec, source: str) -> list[int]:
    """The paper's rules (METHOD 1.6). With "hidden" input and a pruned aux, a base layer that the aux skipped
    reads the aux layer's *output* (the next tap), the hidden state closest to the one that base layer sees."""
    n_base = base.config.num_hidden_layers
    if spec.kind != "pruned":
        return models.layer_map_separate(aux.config.num_hidden_layers, n_base)
    rule = models.layer_map_pruned(spec.keep_layers, n_base)
    if source != "hidden":
        return rule
    return [j if spec.keep_layers[j] == i else j + 1 for i, j in enumerate(rule)]


def _predictor_config(base: PreTrainedModel, aux: PreTrainedModel, layer_map: list[int],
                      source: str, rank: int | None = None) -> PredictorConfig:
    n_base = base.config.num_hidden_layers
    n_aux = aux.config.num_hidden_layers + (source == "hidden")  # "hidden" also offers the final normed state
    if len(layer_map) != n_base or not all(0 <= j < n_aux for j in layer_map):
        raise KVPredError(f"invalid layer map {layer_map}: need {n_base} entries, each an aux layer in [0, {n_aux})")
    (key_features, value_features), aux_widths = (kv_widths(m.model.layers[0].self_attn) for m in (base, aux))
    if source != "hidden" and aux_widths[0] != aux_widths[1]:
        raise KVPredError("auxiliary keys and values differ in width; use source='hidden'")
    return PredictorConfig(layer_map=list(layer_map), in_features=aux.config.hidden_size if source == "hidden"
                           else aux_widths[0], key_features=key_features, value_features=value_features,
                           source=source, rank=rank)


def _beside(checkpoint: Path, recorded: str) -> str:
    """A model path a checkpoint records relative (written by hand, after moving both) is relative to the checkpoint
    folder, not to the current directory; kept as an absolute path, so that a later save elsewhere still finds it."""
    path = Path(recorded).expanduser()
    if not path.is_absolute() and (checkpoint / path).exists():
        return models.stored_name(str(checkpoint / path))
    return recorded


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise KVPredError(f"checkpoint file {path} is missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise KVPredError(f"checkpoint file {path} is corrupt or not safetensors: {err}") from err
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KVPredError(f"checkpoint file {path} is corrupt: tensor {name} holds NaN or infinite values")
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], names: list[str] | None, where: Path) -> None:
    """Copy `state` into `module`, insisting on exactly `names` (all of the module's tensors when None)."""
    own = module.state_dict()
    expected = set(own) if names is None else set(names)
    if not expected <= set(own):
        raise KVPredError(f"{where} names tensors {sorted(expected - set(own))[:5]} the model does not have")
    if set(state) != expected:
        raise KVPredError(f"{where} holds tensors {sorted(set(state) ^ expected)[:5]} that do not match "
                          "the model: the checkpoint does not belong to this configuration")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise KVPredError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the model needs "
                              f"{tuple(own[name].shape)}")
        with torch.no_grad():
            own[name].copy_(tensor)


def _load_aux_tensors(aux: nn.Module, state: dict[str, torch.Tensor], names: list[str], where: Path) -> None:
    """Overlay trained aux tensors: full tensors replace weights, adapter factor pairs are merged into them."""
    if set(state) != set(names):
        raise KVPredError(f"{where} holds {sorted(set(state) ^ set(names))[:5]}, which the config does not list")
    factors = {n: t for n, t in state.items() if n.endswith((lora.SUFFIX_A, lora.SUFFIX_B))}
    plain = {n: t for n, t in state.items() if n not in factors}
    _load_into(aux, plain, list(plain), where)
    own = aux.state_dict()
    for name, a in factors.items():
        if name.endswith(lora.SUFFIX_A):
            weight = name[: -len(lora.SUFFIX_A)]
            b = factors.get(weight + lora.SUFFIX_B)
            if weight not in own or b is None or (b.shape[0], a.shape[1]) != own[weight].shape:
                raise KVPredError(f"{where}: adapter {name} does not fit the auxiliary's weights")
    lora.merge_factors(aux, factors)


def _atomic(path: Path, write) -> None:
    tmp = temporary_name(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -------------------------------------------------------------------- fast-path helpers
STEP_ATTENTION = "kvpred_step"
# On a CPU, a long prompt's predicted K/V outgrow the caches between the predictor's matmuls and the write; chunks of
# this many rows (batch x tokens) took SmolLM2's predictor + write from 85 to 56 ms at 2048 tokens (2 cores). A GPU
# does best with one pass.
CPU_PREDICT_ROWS = 512


class _TapsComplete(Exception):
    """Raised by the auxiliary's last tap: what the auxiliary would compute after it feeds nothing."""


_UNSAID = object()  # an argument the caller did not pass


def _step_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor, scaling: float | None = None, softcap: float | None = None,
                    sliding_window: int | None | object = _UNSAID, **kwargs) -> tuple[torch.Tensor, None]:
    """The static step's attention over a whole buffer under a mask. query [B, Hq, Q, D], key/value [B, Hkv, T, D],
    attention_mask [B, 1, Q, T] bool; returns [B, Q, Hq, Dv] like transformers' sdpa_attention_forward.

    One query token per row (the decode step) runs as two matmuls, without repeating K/V for GQA: the query heads
    sharing a KV head become that head's queries. Not SDPA: under a mask it takes 3-6x longer per layer at 32k tokens
    on an H100, and the CUDA-graph step of Llama-3.2-1B drops from 11.5 to 4.1 ms
    (benchmarks/results/h100/step_attention). Several query tokens per row (a refinement chunk) go to SDPA. A sliding
    layer's queries see only the columns within its window of their own (the slots `static_step` writes)."""
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    # Qwen2-MoE's layers say their window only on the module; EXAONE 4's full layers pass None beside a module's window
    window = getattr(module, "sliding_window", None) if sliding_window is _UNSAID else sliding_window
    if window:  # a sliding layer: each query sees the columns within its window, the last `window` up to its own
        # Its own column, as static_step lays the columns out: the last query's is the last column its mask shows,
        # and the others come right before it. Read from the mask, not passed beside it: torch.compile traces this
        # (compile_step), where a context variable broke the graph in every sliding layer
        # (benchmarks/results/h200/compiled_parts). Only [T] temporaries: a refinement chunk's mask is [B, 1, 256, T]
        columns = torch.arange(key.shape[2], device=key.device)
        last = torch.where(attention_mask[0, 0, -1], columns, -1).amax()
        own = last - torch.arange(q_len - 1, -1, -1, device=key.device)[:, None]  # [Q, 1]
        attention_mask = attention_mask & (columns > own - window)  # [B, 1, Q, T]
    if q_len > 1 and softcap is not None:  # Gemma 2's logits, which SDPA cannot cap
        return capped_attention(query, key, value, attention_mask, scaling, softcap), None
    if q_len > 1:  # a refinement chunk (kvpred.decoding.GraphChunk): enough queries for SDPA's kernels
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=hq != hkv)
        return out.transpose(1, 2).contiguous(), None
    query = query.reshape(b, hkv, hq // hkv, d)  # head h = kv_head * group + r, as repeat_kv lays them out
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scaling or d ** -0.5)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    weights = scores.masked_fill_(~attention_mask, float("-inf")).softmax(-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, Hkv, group, Dv]
    return out.reshape(b, hq, 1, -1).transpose(1, 2).contiguous(), None


class _BufferLayer(CacheLayerMixin):
    """One layer's part of a BufferCache: views [B, H, capacity, D] of the shared arena, filled from the front."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, owner: "BufferCache"):
        super().__init__()
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        # weak: a cache and its layers must not hold each other, or a cache the pool drops (gigabytes on a GPU) stays
        # allocated until Python's cyclic collector happens to run
        self.owner = weakref.proxy(owner)
        self.device = key_buffer.device
        self.is_initialized = True
        self.set_length(0)

    def set_length(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the arena was allocated up front."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.owner.step_slot
        if slot is not None:  # static step (KVPredictionModel.static_step): fixed shapes, the mask hides the rest
            self.key_buffer.index_copy_(2, slot, key_states)
            self.value_buffer.index_copy_(2, slot, value_states)
            return self.key_buffer, self.value_buffer
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            raise KVPredError(f"cache of capacity {self.key_buffer.shape[2]} cannot take {end} tokens")
        self.key_buffer[:, :, self.length:end].copy_(key_states)
        self.value_buffer[:, :, self.length:end].copy_(value_states)
        self.set_length(end)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.key_buffer.shape[2]

    def reset(self) -> None:
        self.set_length(0)

    def crop(self, tokens_to_remove: int) -> None:
        self.set_length(max(0, self.length - abs(tokens_to_remove)))


class BufferCache(Cache):
    """A transformers cache preallocated as one [L, B, H, capacity, D] tensor pair and written in place, so
    neither prefill nor decoding copies what is already cached (DynamicCache re-concatenates on every step).

    Attention sees exactly the filled columns (views), so prefill keeps SDPA's causal fast path; under
    KVPredictionModel.static_step it sees the whole buffer instead, for CUDA graphs.
    """

    def __init__(self, config, batch_size: int, capacity: int, *, dtype: torch.dtype, device: torch.device | str):
        n_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (n_layers, batch_size, kv_heads, capacity, head_dim)
        # zeros, not empty: pages get touched here rather than inside the first timed prefill
        self.key_arena = torch.zeros(shape, dtype=dtype, device=device)
        self.value_arena = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.step_slot: torch.Tensor | None = None
        self.pending_values: PendingValues | None = None  # KVPredictionModel.predict_into(.., defer_values=True)
        super().__init__(layers=[_BufferLayer(self.key_arena[i], self.value_arena[i], self) for i in range(n_layers)])

    def slices(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The arena's first `length` columns, [L, B, H, length, D] views to write a whole prefix at once."""
        if length > self.capacity:
            raise KVPredError(f"cache of capacity {self.capacity} cannot take {length} tokens")
        return self.key_arena[:, :, :, :length], self.value_arena[:, :, :, :length]

    def set_length(self, length: int) -> None:
        """Declare the first `length` columns of every layer filled (after writing them through `slices`)."""
        for layer in self.layers:
            layer.set_length(length)

    def reset(self) -> None:
        self.set_length(0)
        self.pending_values = None
