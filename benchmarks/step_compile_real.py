"""A real model on a GPU with and without `KVPredictionModel.compile_step`: greedy continuations compared token by
token (the compiled step's logits differ by bf16 rounding), and how long `generate` takes either way.

Prompts are consecutive windows of the given text files (this repository's own sources will do: the check is
whether the two steps decode the same tokens, not the model's quality).

    python benchmarks/step_compile_real.py --model smollm2-135m --text 'kvpred/*.py' --prompts 64 --prompt-len 256
"""
from __future__ import annotations

import argparse
import glob
import statistics
import time

import torch

from kvpred.decoding import synchronize
from kvpred.model import KVPredictionModel


def windows(model, pattern: str, count: int, length: int) -> torch.Tensor:
    text = "\n".join(open(path).read() for path in sorted(glob.glob(pattern)))
    ids = model.tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < count * length:
        raise SystemExit(f"{pattern} holds {len(ids)} tokens, fewer than {count} x {length}")
    return ids[:count * length].view(count, length)


def decode_all(model, prompts: torch.Tensor, mode: str, batch: int, new: int) -> tuple[torch.Tensor, float]:
    """Greedy continuations [P, new] and the median seconds per `generate` call."""
    outs, times = [], []
    for rows in prompts.split(batch):
        rows = rows.to(model.device)
        synchronize(model.device)
        start = time.perf_counter()
        out = model.generate(rows, mode=mode, max_new_tokens=new)
        synchronize(model.device)
        times.append(time.perf_counter() - start)
        outs.append(out[:, rows.shape[1]:].cpu())
    return torch.cat(outs), statistics.median(times[1:] or times)


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(first tokens equal, whole continuations equal, mean share of tokens before the first difference)."""
    same = a == b
    before = torch.where(same.all(1), a.shape[1], (~same).float().argmax(1))
    return same[:, 0].float().mean().item(), same.all(1).float().mean().item(), (before / a.shape[1]).mean().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="kvpred/*.py")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    model = KVPredictionModel.from_pretrained(args.model, device="cuda", dtype=torch.bfloat16)
    prompts = windows(model, args.text, args.prompts, args.prompt_len)
    print(f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}; {args.model}; {args.prompts} windows of "
          f"{args.prompt_len} tokens from {args.text}; greedy, {args.new_tokens} new tokens; batches of {args.batch}")
    # the floor: the same eager step at batch 1 against batch B already rounds differently (other GEMM kernels)
    alone = decode_all(model, prompts, "exact", 1, args.new_tokens)[0]
    runs = {}
    for compiled in (False, True):
        if compiled:
            start = time.perf_counter()
            model.compile_step()
            model.generate(prompts[:args.batch].to(model.device), mode="exact", max_new_tokens=2)
            print(f"compile_step + first generate: {time.perf_counter() - start:.1f} s")
        for mode in ("exact", "predicted"):
            decode_all(model, prompts[:args.batch], mode, args.batch, args.new_tokens)  # warm: steps, graphs
            runs[compiled, mode] = decode_all(model, prompts, mode, args.batch, args.new_tokens)
    print("| mode | generate s per batch, eager step | compiled step | speed-up | first token equal | "
          "continuation equal | tokens before the first difference |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for mode in ("exact", "predicted"):
        (plain, t_plain), (comp, t_comp) = runs[False, mode], runs[True, mode]
        first, whole, before = agreement(plain, comp)
        print(f"| {mode} | {t_plain:.4f} | {t_comp:.4f} | {t_plain / t_comp:.2f} | {first:.3f} | {whole:.3f} | "
              f"{before:.3f} |")
    first, whole, before = agreement(alone, runs[False, "exact"][0])
    print(f"| exact, eager step, batch 1 against batch {args.batch} (the floor) | | | | {first:.3f} | {whole:.3f} | "
          f"{before:.3f} |")


if __name__ == "__main__":
    main()
