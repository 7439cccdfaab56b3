"""Do the deep layers' predicted entries help or hurt? With an exact tail of W tokens, the base's layers from
`drop_from` on attend only to the tail (truncation there), the layers before it to the predicted prefix too. First-token
agreement with the exact base on WikiText windows, for the shipped default (CPU). drop_from 30 is plain predicted mode
with that tail; 0 is truncation to the tail.

    python benchmarks/layer_drop_probe.py WINDOWS LENGTH TAILS DROP_FROMS   # e.g. 96 512 128,32,1 30,27,24,20,15,10,5,0
"""
import sys

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from kvpred import KVPredictionModel
from kvpred.model import cache_kwargs
from kvpred.tasks import text_windows

STATE = {"drop_from": 99, "prefix": 0}


def attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, but layers from drop_from on leave out the first `prefix` (predicted) cache entries."""
    if module.layer_idx >= STATE["drop_from"] and STATE["prefix"]:
        p = STATE["prefix"]
        key, value = key[:, :, p:], value[:, :, p:]
        attention_mask = None if attention_mask is None else attention_mask[..., p:]
        if attention_mask is None and query.shape[2] > 1:
            kwargs["is_causal"] = True
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def main(n: int, length: int, tails: list[int], drops: list[int]) -> None:
    torch.set_grad_enabled(False)
    AttentionInterface.register("drop", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("drop", sdpa_mask)
    model = KVPredictionModel.from_pretrained("smollm2-135m")
    base = model.base
    wins = torch.tensor(text_windows(model.tokenizer, "../shared/data/wikitext2-test.txt", length, n))
    print(f"{len(wins)} WikiText windows of {length} tokens, shipped default, CPU fp32", flush=True)
    exact = torch.cat([base(w[None]).logits[:, -1].argmax(-1) for w in wins])
    for tail in tails:
        truncated = torch.cat([base(w[None, -tail:]).logits[:, -1].argmax(-1) for w in wins])
        result = {"truncate": (truncated == exact).float().mean().item()}
        caches = [model.predicted_cache(w[None], torch.ones(1, length, dtype=torch.long), exact_tail=tail)
                  for w in wins]
        for drop_from in drops:
            got = []
            for w, predicted in zip(wins, caches):
                cache = DynamicCache(config=base.config)
                for i, layer in enumerate(predicted.layers):
                    cache.update(layer.keys.clone(), layer.values.clone(), i)
                p = cache.get_seq_length()
                STATE.update(drop_from=drop_from, prefix=p)
                previous, base.config._attn_implementation = base.config._attn_implementation, "drop"
                try:
                    out = base(input_ids=w[None, p:], position_ids=torch.arange(p, length)[None],
                               attention_mask=torch.ones(1, length, dtype=torch.long), **cache_kwargs(base, cache))
                finally:
                    base.config._attn_implementation = previous
                got.append(out.logits[:, -1].argmax(-1))
            result[f"drop_from_{drop_from}"] = (torch.cat(got) == exact).float().mean().item()
        print(f"tail {tail}:", {k: round(v, 3) for k, v in result.items()}, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")],
         [int(x) for x in sys.argv[4].split(",")])
