"""Where `generate()`'s time to first token goes beyond the GPU's work (GPU probe).

For a random-weight timing model of a public shape, `generate(ids, max_new_tokens=2)` is timed per mode after a
warm-up (graphs captured), then run under torch.profiler: for each call, the time from the call to the first token
against the union of GPU kernel time in that window (the rest is the GPU waiting on the host), and the CPU ops
and kernels with the most self time over the calls. cProfile then lists the Python functions with the
most own time over the same calls.

    python benchmarks/generate_host_profile.py --shape llama-3.2-1b --tokens 1024 --device cuda
    python benchmarks/generate_host_profile.py --shape llama-3.2-1b --tokens 1024 --plain --calls 40
"""
import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from generate_ttft import timing_model  # benchmarks/, the script's folder
from torch.profiler import ProfilerActivity, profile, record_function


class FirstToken:
    """A streamer that marks the first new token in the profile and notes its time."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()
            with record_function("first token"):
                pass

    def end(self) -> None:
        pass


def busy_ms(kernels: list[tuple[float, float]], start: float, end: float) -> float:
    """Union of [start, end) intervals of GPU kernels clipped to the window, in ms (profiler times are in us)."""
    spans = sorted((max(s, start), min(e, end)) for s, e in kernels if e > start and s < end)
    total, reach = 0.0, start
    for s, e in spans:
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--plain", action="store_true", help="only the unprofiled times to the first token")
    args = p.parse_args()
    model = timing_model(args.shape, device=args.device)
    gen = torch.Generator().manual_seed(0)
    on_gpu = model.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def call(mode: str) -> float:
        ids = torch.randint(100, model.base.config.vocab_size, (1, args.tokens), generator=gen).to(model.device)
        sync()
        streamer, start = FirstToken(), time.perf_counter()
        with record_function(f"generate {mode}"):
            model.generate(ids, mode=mode, max_new_tokens=2, streamer=streamer)
        return 1e3 * (streamer.first - start)

    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"{args.shape} (random-weight timing model), {device}, bfloat16, batch 1, {args.tokens}-token prompts")
    for mode in ("exact", "predicted"):
        for _ in range(5):
            call(mode)
        plain = [call(mode) for _ in range(args.calls)]
        if args.plain:
            print(f"{mode}: TTFT {statistics.median(plain):.2f} ms (median of {args.calls}, "
                  f"quartiles {statistics.quantiles(plain)[0]:.2f}-{statistics.quantiles(plain)[2]:.2f})")
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=False) as prof:
            for _ in range(args.calls):
                call(mode)
        events = prof.events()
        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA"]
        calls = [e for e in events if e.name == f"generate {mode}"]
        firsts = sorted(e.time_range.start for e in events if e.name == "first token")
        rows = []
        for c in calls:
            first = next(t for t in firsts if t > c.time_range.start)
            rows.append(((first - c.time_range.start) / 1e3, busy_ms(kernels, c.time_range.start, first)))
        print(f"\n{mode}: TTFT {statistics.median(plain):.2f} ms unprofiled (median of {args.calls}); profiled: "
              f"to first token {statistics.median(r[0] for r in rows):.2f} ms, GPU busy "
              f"{statistics.median(r[1] for r in rows):.2f} ms")
        for key in ("self_cpu_time_total", "self_cuda_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90))
        stats = cProfile.Profile()
        stats.enable()
        for _ in range(args.calls):
            call(mode)
        stats.disable()
        out = io.StringIO()
        pstats.Stats(stats, stream=out).sort_stats("tottime").print_stats(30)
        print(f"{mode}: cProfile over {args.calls} calls, by own time\n" + out.getvalue())


if __name__ == "__main__":
    main()
