"""What a matmul shape cuBLAS has not seen costs on the host: bf16 [M, K] x [K, N] at SmolLM2's projection shapes,
first call at each new M vs a call at an M seen before, with each of PyTorch's BLAS back ends.

    python benchmarks/gemm_shape_cost.py
"""
import statistics
import sys
import time

import torch

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K, N): q/o, k/v, up/gate, down, head


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    print("#", " ".join(["python", *sys.argv]), torch.cuda.get_device_name(), "torch", torch.__version__)
    weights = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for k, n in SHAPES]
    for first, backend in ((3000, "cublas"), (4000, "cublaslt")):
        torch.backends.cuda.preferred_blas_library(backend)
        for m in (100, 101):  # lazy initialisation out of the way
            for w in weights:
                timed(lambda: torch.mm(torch.randn(m, w.shape[0], device="cuda", dtype=torch.bfloat16), w))
        new, seen = [], []
        for m in range(first, first + 40):  # M not seen before
            xs = [torch.randn(m, w.shape[0], device="cuda", dtype=torch.bfloat16) for w in weights]
            new.append(timed(lambda: [torch.mm(x, w) for x, w in zip(xs, weights)]))
            seen.append(timed(lambda: [torch.mm(x, w) for x, w in zip(xs, weights)]))
        print(f"{backend:9s} five matmuls at a new M: median {statistics.median(new):.2f} ms "
              f"[{min(new):.2f}-{max(new):.2f}], the same M again: {statistics.median(seen):.2f} ms "
              f"[{min(seen):.2f}-{max(seen):.2f}]")


if __name__ == "__main__":
    main()
