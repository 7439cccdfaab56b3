"""kvpred: KV prediction (Horton et al., arXiv 2410.08391) for Hugging Face causal LMs."""
from .generation import encode_prompts
from .model import KVPredictionModel
from .models import KVPredError

__all__ = ["KVPredictionModel", "KVPredError", "encode_prompts"]
__version__ = "0.1.0"
