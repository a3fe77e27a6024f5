"""Peak memory of a head x position sweep and of EAP over every edge, against the problem size.

    python benchmarks/memory.py [--threads 1] [--sweep 2x4,6x8] [--sweep-batch 16] [--sweep-other-batch 64]
                                [--eap 4x16,32x16] [--eap-batch 4] [--eap-other-batch 16]

Each measurement runs in a fresh Python subprocess on the random GPT-2-small-shaped model
(12 layers, 12 heads, d_model 768, vocab 50257; `setups.gpt2_small_shaped`), so its peak is its own:

1. build the model and a random-token task of `n` prompts of length `seq`, drop the raw copy
   that `setups` builds for other benchmarks, collect garbage;
2. baseline = resident set size now (model + task), then reset the kernel's high-water mark
   (`/proc/self/clear_refs`, so the model build's own transient peak does not count);
3. run ONE of
   - sweep: `il.patching.heads(m, task, per_position=True, batch_size=B, progress=False)`,
     components = layers x heads x positions, rows = components x n (patched forward rows)
   - EAP:   `il.attribution.edges(m, task, method="EAP", batch_size=B)`,
     components = edges of the Graph, rows = n (each example runs once);
4. peak = `resource.getrusage(RUSAGE_SELF).ru_maxrss`; growth = peak - baseline.

How to read it: sizes are given as `NxSEQ`. At one batch size, the growth should stay about the
same when components x rows grow several-fold (memory bounded by `batch_size`), and change when
the batch size does (the extra row per method); the closing lines give these ratios. Growth that
scales with rows at a fixed batch size means something of size (components or rows) x ... is kept
across batches. The sweep groups its rows by patched position (it reuses the base run's keys and
values of earlier positions), so one forward holds at most min(batch_size, n_heads x n) rows:
choose `n` with n_heads x n >= batch_size, or the batch size cannot show. The growth of one batch
still depends on `seq` (activations are batch x seq x ...) and, for EAP, on the number of senders
and receivers (one batch holds sender differences and receiver gradients, `[S or R, B, seq, d_model]`).
RSS counts what the allocator holds: repeated runs of one row differed by up to about 10%.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MiB = 1024  # ru_maxrss and /proc/self/status report kB
METHODS = ("sweep", "EAP")


def resident_kb() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0), which ru_maxrss reads. False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS, so the baseline is what is live, not what malloc keeps."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline may include freed pages, which only makes growth smaller


def measure(method: str, n: int, seq: int, batch_size: int, threads: int) -> dict:
    """Run one method on a fresh model in this process; baseline, peak and size figures (kB, s)."""
    import torch

    import interplab as il
    from setups import gpt2_small_shaped

    torch.set_num_threads(threads)
    _, m, raw, task = gpt2_small_shaped(n, seq)
    del raw  # the unwrapped copy is for the speed benchmarks' baselines, not used here
    release_free_memory()
    baseline = resident_kb()
    peak_reset = reset_peak()
    start = time.perf_counter()
    if method == "sweep":
        scores = il.patching.heads(m, task, per_position=True, batch_size=batch_size, progress=False)
        components = scores.values.numel()  # (layer, head, pos)
        rows = components * n
    else:
        circuit = il.attribution.edges(m, task, method="EAP", batch_size=batch_size)
        components = il.circuits.Graph.from_model(m).n_edges
        rows = n
        del circuit
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(method=method, n=n, seq=seq, batch_size=batch_size, components=components, rows=rows,
                baseline_kb=baseline, peak_kb=peak, peak_reset=peak_reset, seconds=seconds)


def run_isolated(method: str, n: int, seq: int, batch_size: int, threads: int) -> dict:
    """`measure` in a fresh interpreter, so ru_maxrss is that run's alone."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", f"{method},{n},{seq},{batch_size}",
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1x4,8x8' -> [(1, 4), (8, 8)]: (n prompts, seq) pairs."""
    try:
        sizes = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must look like '1x4,8x8' (n x seq, comma-separated), got {text!r}")
    return sizes


def plan(args) -> list[tuple[str, int, int, int]]:
    """(method, n, seq, batch_size) per run: every size at the main batch size, the largest at the other one."""
    runs = []
    for method, sizes, batch, other in (("sweep", args.sweep, args.sweep_batch, args.sweep_other_batch),
                                        ("EAP", args.eap, args.eap_batch, args.eap_other_batch)):
        runs += [(method, n, seq, batch) for n, seq in sizes]
        if other:
            n, seq = sizes[-1]
            runs.append((method, n, seq, other))
    return runs


def growth(r: dict) -> int:
    return r["peak_kb"] - r["baseline_kb"]


def print_row(r: dict) -> None:
    print(f"{r['method']:>6} {r['n']:>4} {r['seq']:>4} {r['components']:>10,} {r['rows']:>8,} {r['batch_size']:>6}"
          f" {r['baseline_kb'] / MiB:>10.0f} {r['peak_kb'] / MiB:>10.0f} {growth(r) / MiB:>10.0f} {r['seconds']:>8.1f}",
          flush=True)


def summarize(results: list[dict]) -> None:
    """Per method: how much growth changed against rows (same batch size) and against the batch size."""
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if len(runs) < 2:
            continue
        first, same_batch = runs[0], [r for r in runs if r["batch_size"] == runs[0]["batch_size"]]
        last = same_batch[-1]
        print(f"{method}: rows x{last['rows'] / first['rows']:.1f}, components x"
              f"{last['components'] / first['components']:.1f} at batch {first['batch_size']}: growth x"
              f"{growth(last) / growth(first):.2f}", end="")
        other = [r for r in runs if r["batch_size"] != first["batch_size"]]
        if other:
            print(f"; batch {last['batch_size']} -> {other[-1]['batch_size']} on the same size: growth x"
                  f"{growth(other[-1]) / growth(last):.2f}", end="")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--sweep", type=parse_sizes, default=parse_sizes("2x4,6x8"), help="n x seq sizes")
    parser.add_argument("--sweep-batch", type=int, default=16)
    parser.add_argument("--sweep-other-batch", type=int, default=64, help="0: no extra row")
    parser.add_argument("--eap", type=parse_sizes, default=parse_sizes("4x16,32x16"), help="n x seq sizes")
    parser.add_argument("--eap-batch", type=int, default=4)
    parser.add_argument("--eap-other-batch", type=int, default=16, help="0: no extra row")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # method,n,seq,batch_size: one measurement, JSON out
    args = parser.parse_args()
    if args.one:
        method, *numbers = args.one.split(",")
        if method not in METHODS:
            parser.error(f"--one method must be one of {METHODS}, got {method!r}")
        print(json.dumps(measure(method, *map(int, numbers), args.threads)))
        return

    print(f"GPT-2-small shape (12L, 12H, 768, random), {args.threads} thread(s), one subprocess per row; MiB")
    print(f"{'method':>6} {'n':>4} {'seq':>4} {'components':>10} {'rows':>8} {'batch':>6}"
          f" {'baseline':>10} {'peak':>10} {'growth':>10} {'seconds':>8}")
    results = []
    for run in plan(args):
        results.append(run_isolated(*run, args.threads))
        print_row(results[-1])
    summarize(results)
    if not all(r["peak_reset"] for r in results):
        print("note: the high-water mark could not be reset here, so peaks include the model build")


if __name__ == "__main__":
    main()
