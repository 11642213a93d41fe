"""Where does a short prompt's time to first token go? One engine step of a 16-token prompt, taken apart.

A bf16 folder at the Qwen-7B shape (random weights, official layout, written once under --workdir, the folder the
other scripts use), loaded as a user loads it, `LLM(folder)` (the default config: compiled prefill regions, CUDA
graphs for decode), the engine otherwise idle. Each request has a prompt the prefix cache has not seen and 1 new
token, so its first token is the whole request.

  ttft         add_request to the token on the host, through `engine.step()` as `qwenlm serve`'s engine loop calls
               it: median and spread of --repeats requests after --warmup
  split        the same step done by hand: schedule (host), launch (host: the prefill forward, lm_head and sampler
               queued, nothing waited for), wait (the device finishing what was queued, and the copy of the token
               to the host), process (the outputs built)
  kernels      torch.profiler over --profile requests: device time of all kernels per request and their count,
               the top operators by host time and by device time (written beside the JSON as a text table)
  bound        the bytes of one pass over the weights at the measured copy bandwidth: the floor of any TTFT

If launch is far above kernels, the host is what the request waits for (Python, guards, kernel launches); if
kernels are far above the bound, the kernels are.

    python bench/bench_ttft.py              # H100: ~1 minute once the folder exists
    python bench/bench_ttft.py --tiny       # tiny shapes on the CPU: checks the script end to end
    python bench/bench_ttft.py --prompt-len 2048
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from benchlib import (checkpoint, exit_code, greedy, isolated, log, print_table, prompts, results_path, spread, start,
                      time_to_first_token, weight_bytes_per_step, write_json)

SIZES = dict(warmup=3, repeats=10, profile=3)
TINY_SIZES = dict(warmup=1, repeats=3, profile=1)


def split_step(engine, prompt: list[int]) -> dict:
    """One request's only step, done by hand in engine.step()'s order (no look-ahead: 1 token ends the request);
    milliseconds of each piece."""
    engine.add_request(None, prompt, greedy(1))
    t0 = time.perf_counter()
    batch = engine.scheduler.schedule()
    t1 = time.perf_counter()
    step = engine._launch(batch, None)
    t2 = time.perf_counter()
    if step.done is not None:
        step.done.synchronize()
    t3 = time.perf_counter()
    outs = engine._process(step)
    t4 = time.perf_counter()
    assert outs and outs[0].outputs[0].token_ids and not engine.has_unfinished()
    return {"schedule": (t1 - t0) * 1e3, "launch": (t2 - t1) * 1e3, "wait": (t3 - t2) * 1e3,
            "process": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}


def kernel_profile(engine, batch: list[list[int]], device: str) -> tuple[dict, str]:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for p in batch:
            time_to_first_token(engine, p)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per = len(batch)
    res = {"kernel_ms_per_request": sum(e.device_time for e in kernels) / 1e3 / per if kernels else None,
           "kernels_per_request": len(kernels) / per if kernels else None}
    text = events.table(sort_by="self_cpu_time_total", row_limit=25)
    if device == "cuda":
        text += "\n\n" + events.table(sort_by="self_device_time_total", row_limit=25)
    return res, text


def ttft_part(folder, prompt_len: int, sizes: dict, device: str) -> dict:
    from qwenlm.engine import LLM
    engine = LLM(str(folder), device=device)
    seed = iter(range(100, 10_000))
    one = lambda: prompts(1, prompt_len, next(seed))[0]  # noqa: E731 (a prompt the prefix cache has not seen)
    for _ in range(sizes["warmup"]):
        time_to_first_token(engine, one())
    res = {"ttft_ms": spread([1e3 * time_to_first_token(engine, one()) for _ in range(sizes["repeats"])])}
    splits = [split_step(engine, one()) for _ in range(sizes["repeats"])]
    res["split_ms"] = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    prof, res["profile_table"] = kernel_profile(engine, [one() for _ in range(sizes["profile"])], device)
    res.update(prof)
    return res


def main() -> int:
    args, device, sizes, results, bw = start("bench_ttft", __doc__, SIZES, TINY_SIZES, lambda ap: ap.add_argument(
        "--prompt-len", type=int, default=16, help="prompt tokens (default 16)"))
    folder = checkpoint(args.workdir, "bf16", args.tiny, device)
    r = isolated(device, ttft_part, folder, args.prompt_len, sizes, device)
    r["bound_ms"] = weight_bytes_per_step(folder) / bw * 1e3
    results.update(prompt_len=args.prompt_len, parts={"ttft": r})
    path = write_json(results, results_path("bench_ttft", args.json))
    if "profile_table" in r:
        path.with_suffix(".profile.txt").write_text(r["profile_table"])
        log(f"wrote {path.with_suffix('.profile.txt')}")
    if "error" in r:
        return exit_code(results["parts"])
    t, s = r["ttft_ms"], r["split_ms"]
    print_table(f"time to first token, {args.prompt_len}-token prompt: {results['header']['device']}",
                ["figure", "ms"],
                [["TTFT (engine.step) median", t["median"]], ["  min-max", f"{t['min']:.1f}-{t['max']:.1f}"],
                 *[[f"split: {k}", v] for k, v in s.items()],
                 ["kernel time / request", r["kernel_ms_per_request"]],
                 ["kernels / request", r["kernels_per_request"]],
                 ["bound: one pass over the weights", r["bound_ms"]]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
