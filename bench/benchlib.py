"""What the benchmark scripts share: the progress log, JSON results under $OUT, and the one measurement of
achievable memory bandwidth that every "bound" figure is divided from."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

T0 = time.time()
OUT = os.environ.get("OUT", ".")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save_json(results: dict, name: str, indent: int = 2) -> None:
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(results, f, indent=indent)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def replay_seconds(graph, reps: int) -> float:
    """Seconds for `reps` back-to-back replays of a CUDA graph, timed by events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_bandwidth(device) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy (the achievable streaming rate);
    median of 10 timed copies after 3 warm-ups. CPU: a nominal 50 GB/s, only so --tiny runs print something."""
    if torch.device(device).type != "cuda":
        return 50e9
    a = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    bw = 2 * a.numel() * a.element_size() / statistics.median(times)
    del a, b
    return bw
