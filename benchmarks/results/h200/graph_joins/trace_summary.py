"""Summarise trace_{predicted,exact}.json.gz (trace_generate.py): for the second call of each mode, the GPU's work
from the call to the first token in bursts (kernels less than 20 us apart), and the host's top-level operations
before the prompt pass's graph launch. Run here: python trace_summary.py > trace_summary.txt"""
import collections
import gzip
import json

for mode in ("predicted", "exact"):
    events = [e for e in json.load(gzip.open(f"trace_{mode}.json.gz"))["traceEvents"] if e.get("ph") == "X"]
    start = sorted(e["ts"] for e in events if e["name"] == f"generate {mode}")[1]
    first = min(e["ts"] for e in events if e["name"] == "first token" and e["ts"] > start)
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                      and start <= e["ts"] < first), key=lambda e: e["ts"])
    print(f"{mode}: call to first token {(first - start) / 1e3:.2f} ms (profiled), {len(kernels)} GPU operations")
    bursts = []
    for k in kernels:
        if bursts and k["ts"] - bursts[-1]["end"] < 20:
            b = bursts[-1]
            b["end"], b["n"] = max(b["end"], k["ts"] + k["dur"]), b["n"] + 1
            b["names"][k["name"][:50]] += k["dur"]
        else:
            bursts.append({"start": k["ts"], "end": k["ts"] + k["dur"], "n": 1,
                           "names": collections.Counter({k["name"][:50]: k["dur"]})})
    for b in bursts:
        top = ", ".join(f"{n} {d:.0f} us" for n, d in b["names"].most_common(2))
        print(f"  +{(b['start'] - start) / 1e3:5.2f} ms  {(b['end'] - b['start']) / 1e3:5.2f} ms  {b['n']:4d}  {top}")
    launch = min((e for e in events if e["name"] == "cudaGraphLaunch" and e["ts"] > start), key=lambda e: e["ts"])
    print(f"  the prompt pass's cudaGraphLaunch at +{(launch['ts'] - start) / 1e3:.2f} ms took "
          f"{launch['dur'] / 1e3:.2f} ms; host operations before it:")
    ops, reach = collections.Counter(), 0
    for e in sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime") and start <= e["ts"] < launch["ts"]),
                    key=lambda e: e["ts"]):
        if e["ts"] >= reach:  # top level only
            ops[e["name"]] += 1
            reach = e["ts"] + e["dur"]
    print("   ", ", ".join(f"{n} x{c}" for n, c in ops.most_common()))
