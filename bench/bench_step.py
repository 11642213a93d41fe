"""Where a batch-1 Int4 decode step's time goes, through the engine: the step rate of `LLMEngine`, the rate of its
CUDA graph replayed alone (no host work, no sampling), and the kernel timeline of one replay from the profiler
(per kernel of a layer: start-to-start time, duration; the head; gaps).

    PYTHONPATH=. python bench/bench_step.py            # Int4 GPTQ, random weights at the Qwen-7B shape, H100

Prints the three rates side by side with the bandwidth bound (measured copy / bytes per token).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quant import build_model, greedy, prompts_of, run_timed, streamed_bytes  # noqa: E402
from benchlib import copy_bandwidth, log, replay_seconds, save_json  # noqa: E402
from qwenlm.config import ModelConfig  # noqa: E402
from qwenlm.engine import EngineConfig, LLMEngine  # noqa: E402


def graph_rate(graph, reps=200) -> float:
    """Replays of the decode graph per second, back to back."""
    for _ in range(10):
        graph.replay()
    return reps / replay_seconds(graph, reps)


def step_times(engine, n: int):
    """Wall time of each decode `engine.step()` of one greedy request of n new tokens, ms, and the host time each
    spent before it waited for its tokens (launching the next step, scheduling), ms."""
    from qwenlm.engine.runner import ModelRunner
    engine.add_request(None, prompts_of(1, 16, engine.model.config.vocab_size, 4)[0], greedy(n))
    resolve = ModelRunner.resolve
    host = []

    def timed_resolve(step):
        host.append(time.perf_counter())
        return resolve(step)

    engine.runner.resolve = timed_resolve
    walls, before = [], []
    try:
        while engine.has_unfinished():
            t0 = time.perf_counter()
            host.clear()
            engine.step()
            t1 = time.perf_counter()
            if not engine.last_step_was_prefill:
                walls.append((t1 - t0) * 1e3)
                before.append((host[0] - t0) * 1e3 if host else float("nan"))
    finally:
        del engine.runner.resolve
    return walls, before


def cuda_events(prof) -> list:
    """The GPU kernels and copies a profiler saw, in start order: [(name, start µs, duration µs)]."""
    return sorted(((e.name, e.time_range.start, e.time_range.end - e.time_range.start) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[1])


def timeline(graph):
    """Kernels of one replay from the profiler, in start order, starts from the first: [(name, start µs, µs)]."""
    from torch.profiler import ProfilerActivity, profile
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ks = cuda_events(prof)
    t0 = ks[0][1] if ks else 0
    return [(n, s - t0, d) for n, s, d in ks]


def between_replays(engine, graph_seq: list, steps: int = 6):
    """GPU work of engine steps outside the decode graph: the ops between the last two replays as
    [(name, duration µs, gap µs since the previous op ended)], the gap before the next replay, and the step
    periods µs. A replay is found as the graph's own sequence of kernel names."""
    from torch.profiler import ProfilerActivity, profile
    engine.add_request(None, prompts_of(1, 16, engine.model.config.vocab_size, 5)[0], greedy(steps + 8))
    for _ in range(4):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    ev = cuda_events(prof)
    names = [n for n, _, _ in ev]
    L = len(graph_seq)
    starts, i = [], 0
    while i + L <= len(ev):
        if names[i:i + L] == graph_seq:
            starts.append(i)
            i += L
        else:
            i += 1
    periods = [ev[b][1] - ev[a][1] for a, b in zip(starts[:-1], starts[1:])]
    a, b = starts[-2] + L, starts[-1]
    out, prev_end = [], ev[a - 1][1] + ev[a - 1][2]
    for n, s, d in ev[a:b]:
        out.append((n, d, s - prev_end))
        prev_end = max(prev_end, s + d)
    return out, periods, ev[b][1] - prev_end


def per_layer(ks, layers: int):
    """Group the timeline into layers: a layer starts at every per-th kernel named like the first kernel whose count
    is a multiple of `layers` (per of them to a layer). Returns the layers' first indices (and len(ks)) and, per
    slot j of a layer, the start-to-next-start times, durations and end-to-end times (from the end of the kernel
    before to this one's end: with programmatic dependent launch, what the kernel adds to the chain) of its kernels
    over all layers."""
    counts = collections.Counter(n for n, _, _ in ks)
    first = next(n for n, _, _ in ks if counts[n] % layers == 0)
    starts = [i for i, (n, _, _) in enumerate(ks) if n == first]
    per = counts[first] // layers  # kernels named `first` per layer
    bounds = starts[::per] + [len(ks)]
    size = bounds[1] - bounds[0]  # kernels per layer
    rows = collections.defaultdict(lambda: ([], [], []))  # slot -> (start-to-next-start, duration, end-to-end)
    for a in bounds[:-1]:
        for j in range(size):
            _, s, d = ks[a + j]
            if a + j + 1 < len(ks):
                rows[j][0].append(ks[a + j + 1][1] - s)
            rows[j][1].append(d)
            if a + j > 0:
                rows[j][2].append(s + d - (ks[a + j - 1][1] + ks[a + j - 1][2]))
    return bounds, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="int4")
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    cfg = ModelConfig()  # Qwen-7B
    bw = copy_bandwidth("cuda")
    model = build_model(cfg, args.kind, "cuda", torch.float16)
    engine = LLMEngine(model, None, EngineConfig(num_blocks=2048 // 16 + 1, block_size=16, max_num_seqs=1,
                                                 max_num_batched_tokens=2048, cuda_graph_batch_sizes=[1],
                                                 compile_decode=True))
    run_timed(engine, prompts_of(1, 16, cfg.vocab_size, 1), greedy(16))
    rates = []
    for seed in (2, 3):
        _, dec_s, dec_tok = run_timed(engine, prompts_of(1, 16, cfg.vocab_size, seed), greedy(args.new_tokens))
        rates.append(dec_tok / dec_s)
    walls, before = step_times(engine, args.new_tokens)
    graph = engine.runner.graphs[1]
    g_rates = [graph_rate(graph) for _ in range(3)]
    bound = bw / streamed_bytes(model)
    layers = cfg.num_hidden_layers
    ks = timeline(graph)
    span = ks[-1][1] + ks[-1][2]
    busy, end = 0.0, 0.0
    for _, s, d in ks:  # union of kernel intervals
        busy += max(0.0, s + d - max(s, end))
        end = max(end, s + d)
    bounds, rows = per_layer(ks, layers)
    print(f"\n==== batch-1 {args.kind} decode step ({torch.cuda.get_device_name()}) ====")
    print("| engine tok/s | graph replayed alone tok/s | bound tok/s (copy {:.0f} GB/s) |".format(bw / 1e9))
    print(f"| {statistics.median(rates):.1f} ({', '.join(f'{r:.1f}' for r in rates)}) | "
          f"{statistics.median(g_rates):.1f} | {bound:.1f} |")
    q = statistics.quantiles(walls, n=10)
    print(f"\nengine decode steps, wall ms: median {statistics.median(walls):.3f}, mean {statistics.mean(walls):.3f}, "
          f"p10 {q[0]:.3f}, p90 {q[-1]:.3f}, max {max(walls):.3f}; > 1.2 x median: "
          f"{sum(w > 1.2 * statistics.median(walls) for w in walls)} of {len(walls)}")
    print(f"host time per step before waiting for its tokens, ms: median {statistics.median(before):.3f}, "
          f"max {max(before):.3f}")
    print(f"\none replay under the profiler: {len(ks)} kernels, span {span:.1f} µs, kernels busy {busy:.1f} µs")
    print(f"layers start at kernel {bounds[0]}, {(bounds[-2] - bounds[0]) / layers:.0f} kernels per layer")
    mid = ks[bounds[1]:bounds[2]] if len(bounds) > 3 else []
    print("\n| slot in layer (layer 1) | kernel | start to next start µs (median over layers) | "
          "duration µs (median) | end of the kernel before to its end µs (median) |")
    print("| --- | --- | --- | --- | --- |")
    for j, (n, _, _) in enumerate(mid):
        nx, du, ee = rows[j]
        print(f"| {j} | {n[:70]} | {statistics.median(nx) if nx else float('nan'):.2f} | "
              f"{statistics.median(du):.2f} | {statistics.median(ee) if ee else float('nan'):.2f} |")
    lay = [ks[b][1] for b in bounds[:-1]]
    periods = [b - a for a, b in zip(lay[:-1], lay[1:])]
    print(f"\nlayer period µs: median {statistics.median(periods):.2f}, min {min(periods):.2f}, "
          f"max {max(periods):.2f}")
    print(f"before the first layer: {lay[0]:.1f} µs ({bounds[0]} kernels); from the last layer's start to the end: "
          f"{span - lay[-1]:.1f} µs")
    print("\nkernels before the layers and after the last layer's start:")
    for n, s, d in ks[:bounds[0]] + ks[bounds[-2]:]:
        print(f"  {s:9.1f} +{d:7.2f}  {n[:90]}")
    ops, step_periods, gap = between_replays(engine, [n for n, _, _ in ks])
    print(f"\nengine steps under the profiler: period µs {', '.join(f'{p:.1f}' for p in step_periods)}")
    print("GPU work between two replays (after the graph's last kernel), duration and gap before it, µs:")
    for n, d, g in ops:
        print(f"  +{d:7.2f}  gap {g:6.2f}  {n[:90]}")
    print(f"  gap before the next replay: {gap:.2f}")
    save_json(dict(engine_tok_s=rates, graph_tok_s=g_rates, bound_tok_s=bound, span_us=span, busy_us=busy,
                   layer_period_us=periods, timeline=ks), "bench_step.json", indent=None)
    log("done")


if __name__ == "__main__":
    main()
