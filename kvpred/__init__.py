"""kvpred: KV prediction (Horton et al., arXiv 2410.08391) for Hugging Face causal LMs."""
from importlib import import_module

__all__ = ["KVPredictionModel", "KVPredError", "encode_prompts"]
__version__ = "0.1.0"
# Imported on first use, so that the `kvpred` command starts inside its own error handling (kvpred.launch): a Ctrl+C
# while torch loads is then a quiet interruption, not a traceback.
_HOMES = {"KVPredictionModel": ".model", "KVPredError": ".errors", "encode_prompts": ".generation"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'kvpred' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
