"""How fast is `qwenlm serve` for its clients, and how much of the engine's speed does it keep?

A bf16 checkpoint folder in the official layout (random weights at the Qwen-7B shape, written once under --workdir)
served as a user serves it, `qwenlm serve --model <folder>` (the default config), driven over loopback by an asyncio
+ httpx load generator: streamed /v1/completions with token-id prompts, greedy, ignore_eos. Per run it reports what
vLLM's benchmark_serving and guidellm report: request throughput, output tok/s, TTFT, TPOT (per request: (e2e -
TTFT) / (tokens - 1)) and ITL (gaps between a stream's chunks) as mean, p50 and p99; for the 128-stream run also
the ITL once every prompt is in (between the last first token and the first finished request). Then the server
stops and the same requests run offline through `LLM(folder).generate` (a fresh process on a GPU), and the ratios
are printed.

  start        seconds from `qwenlm serve` to its first answered request: a first and a second start (the
               second hot-loads the compiled kernels cached on disk)
  sweep        fixed concurrency 1, 8, 32, 128 (128 x 512-token prompts / 256 new tokens is the throughput figure),
               and batch-1 decode over HTTP (16-token prompt, 256 new tokens: tokens/s from first chunk to last)
  poisson      requests arriving at a Poisson rate (a stream of 512/256 requests)
  ttft         one request at a time, 16- and 2,048-token prompts, 1 new token: TTFT over HTTP
  int8_kv      the 128-stream run with --kv-cache-dtype int8, against the engine with the same cache
  int4         batch-1 decode of a GPTQ Int4 folder (as Qwen-7B-Chat-Int4) through HTTP and through the engine
  offline      the same work through the engine (throughput, batch-1 decode, TTFT) for the ratios
  guidellm     if the `guidellm` command is installed: its sweep against the same server, figures beside ours

    python bench/bench_serve.py               # H100: ~5 minutes (the first run also writes the folder, compiles)
    python bench/bench_serve.py --tiny        # tiny shapes on the CPU: checks the script end to end
    python bench/bench_serve.py --only sweep,offline

Prints one table per part and the ratio table (figure | server | engine | ratio); writes the JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (checkpoint, decode_rate, isolated, log, print_table, prompts, results_path, selected,
                      start, throughput, time_to_first_token, write_json)

PARTS = ["start", "sweep", "poisson", "ttft", "int8_kv", "int4", "offline", "guidellm"]
SIZES = dict(concurrency=[1, 8, 32, 128], min_requests=8, prompt_len=512, new_tokens=256, poisson_rate=8.0,
             poisson_requests=128, ttft_lens={"short": 16, "long": 2048}, ttft_repeats=5, b1_prompt=16, b1_new=256,
             guidellm_rates=6, guidellm_seconds=20)
TINY_SIZES = dict(concurrency=[1, 4], min_requests=2, prompt_len=32, new_tokens=8, poisson_rate=20.0,
                  poisson_requests=6, ttft_lens={"short": 16, "long": 128}, ttft_repeats=2, b1_prompt=16, b1_new=16,
                  guidellm_rates=3, guidellm_seconds=3)


# ---------------------------------------------------------------- the server

class Server:
    """`qwenlm serve` on a free port, as a user starts it; `stop()` sends SIGTERM (a clean shutdown)."""

    def __init__(self, folder, device: str, *extra: str):
        from qwenlm.server.launch import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        t = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "qwenlm.cli", "serve", "--model", str(folder), "--device",
                                      device, "--port", str(self.port), *extra])
        import httpx
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"qwenlm serve exited with code {self.proc.returncode}")
            time.sleep(0.1)
        r = httpx.post(self.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1}, timeout=600)
        r.raise_for_status()
        self.start_s = time.perf_counter() - t  # to the first answered request
        log(f"qwenlm serve ready at {self.url} in {self.start_s:.1f} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the load generator

async def one_request(http, prompt: list[int], new_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunks, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data.get("choices"):
                chunks.append(time.perf_counter())
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {"start": t0, "chunks": chunks, "end": time.perf_counter(), "tokens": tokens}


async def run_load(url: str, requests: list[list[int]], new_tokens: int, concurrency: int | None = None,
                   rate: float | None = None) -> list[dict]:
    """All `requests`, at most `concurrency` at once, or arriving at a Poisson `rate` per second."""
    import httpx
    gate = asyncio.Semaphore(concurrency or len(requests))
    gaps = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=None)) as http:
        async def send(prompt, delay):
            await asyncio.sleep(delay)
            async with gate:
                return await one_request(http, prompt, new_tokens)
        delays, t = [], 0.0
        for _ in requests:
            delays.append(t)
            t += gaps.expovariate(rate) if rate else 0.0
        return await asyncio.gather(*[send(p, d) for p, d in zip(requests, delays)])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def dist(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    v = [x * scale for x in values]
    return {"mean": statistics.fmean(v), "p50": pct(v, 50), "p99": pct(v, 99)}


def summarize(runs: list[dict]) -> dict:
    """benchmark_serving's figures (ms for latencies), plus ITL once every request has its first token."""
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    ttft = [r["chunks"][0] - r["start"] for r in runs]
    tpot = [(r["end"] - r["chunks"][0]) / (r["tokens"] - 1) for r in runs if r["tokens"] > 1]
    itl = [b - a for r in runs for a, b in zip(r["chunks"], r["chunks"][1:])]
    all_in, first_done = max(r["chunks"][0] for r in runs), min(r["end"] for r in runs)
    steady = [b - a for r in runs for a, b in zip(r["chunks"], r["chunks"][1:]) if a >= all_in and b <= first_done]
    return {"requests": len(runs), "wall_s": wall, "request_s": len(runs) / wall, "output_tok_s": tokens / wall,
            "ttft_ms": dist(ttft), "tpot_ms": dist(tpot), "itl_ms": dist(itl), "itl_all_in_ms": dist(steady)}


def load_rows(results: dict) -> list[list]:
    rows = []
    for name, s in results.items():
        if "error" in s:
            rows.append([name, s["error"][:60]] + [None] * 9)
            continue
        rows.append([name, s["requests"], s["request_s"], s["output_tok_s"], s["ttft_ms"]["mean"], s["ttft_ms"]["p50"],
                     s["ttft_ms"]["p99"], s["tpot_ms"]["mean"], s["itl_ms"]["p50"], s["itl_ms"]["p99"],
                     s["itl_all_in_ms"]["p99"]])
    return rows


LOAD_COLUMNS = ["run", "requests", "req/s", "out tok/s", "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean",
                "ITL p50", "ITL p99", "ITL p99 all in"]


def serve_part(folder, device: str, sizes: dict, parts: list[str], extra: tuple = ()) -> dict:
    res = {"load": {}}
    server = Server(folder, device, *extra)
    res["start_s"] = server.start_s
    try:
        n, new = sizes["prompt_len"], sizes["new_tokens"]
        for c in (sizes["concurrency"] if "sweep" in parts else []):
            batch = prompts(max(c, sizes["min_requests"]), n, 1000 + c)
            res["load"][f"concurrency {c}"] = summarize(asyncio.run(run_load(server.url, batch, new, concurrency=c)))
            log(f"concurrency {c}: {res['load'][f'concurrency {c}']['output_tok_s']:.0f} output tok/s")
        if "poisson" in parts:
            batch = prompts(sizes["poisson_requests"], n, 2000)
            res["load"][f"poisson {sizes['poisson_rate']}/s"] = summarize(
                asyncio.run(run_load(server.url, batch, new, rate=sizes["poisson_rate"])))
        if "ttft" in parts:
            for which, length in sizes["ttft_lens"].items():
                asyncio.run(run_load(server.url, prompts(1, length, 50), 1))  # warm-up at this length
                runs = [asyncio.run(run_load(server.url, prompts(1, length, 3000 + r), 1))[0]
                        for r in range(sizes["ttft_repeats"])]
                res[f"ttft_{which}_ms"] = statistics.median(1e3 * (r["chunks"][0] - r["start"]) for r in runs)
        if "b1" in parts:  # batch-1 decode through HTTP: tokens/s between the first chunk and the last
            r = asyncio.run(run_load(server.url, prompts(1, sizes["b1_prompt"], 4000), sizes["b1_new"]))[0]
            res["b1_decode_tok_s"] = (r["tokens"] - 1) / (r["end"] - r["chunks"][0])
    finally:
        server.stop()
    return res


def offline_part(folder, device: str, sizes: dict, kv_cache_dtype: str, what: tuple) -> dict:
    """The same requests through the engine in this (fresh) process: `what` of throughput, b1, ttft."""
    from qwenlm.engine import LLM
    engine = LLM(str(folder), device=device, kv_cache_dtype=kv_cache_dtype)
    decode_rate(engine, prompts(1, 16, 1)[0], 8)  # warm-up
    c = max(sizes["concurrency"])
    batch = prompts(max(c, sizes["min_requests"]), sizes["prompt_len"], 1000 + c)  # the sweep's largest run
    res = {}
    if "throughput" in what:
        res["output_tok_s"] = throughput(engine, batch, sizes["new_tokens"])["output_tok_s"]
    if "b1" in what:
        res["b1_decode_tok_s"] = decode_rate(engine, prompts(1, sizes["b1_prompt"], 4000)[0], sizes["b1_new"])
    if "ttft" in what:
        for which, length in sizes["ttft_lens"].items():
            time_to_first_token(engine, prompts(1, length, 50)[0])
            res[f"ttft_{which}_ms"] = statistics.median(1e3 * time_to_first_token(engine, prompts(1, length, 3000 + r)[0])
                                                        for r in range(sizes["ttft_repeats"]))
    return res


def hf_tokenizer(folder, workdir: str) -> str:
    """A folder with Qwen's tokenizer as a Hugging Face tokenizer.json (guidellm counts and makes its synthetic
    tokens with one): transformers' TikTokenConverter over the checkpoint's qwen.tiktoken, Qwen's split pattern,
    special tokens and NFC normalisation, so its ids are the official tokenizer's."""
    out = os.path.join(workdir, "qwen-tokenizer-hf")
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from qwenlm.tokenizer import ENDOFTEXT, PAT_STR, SPECIAL_TOKENS
        from tokenizers import normalizers
        converted = TikTokenConverter(vocab_file=os.path.join(folder, "qwen.tiktoken"), pattern=PAT_STR,
                                      extra_special_tokens=list(SPECIAL_TOKENS)).converted()
        converted.normalizer = normalizers.NFC()  # Qwen's tokenizer NFC-normalises first
        PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=ENDOFTEXT).save_pretrained(out)
    return out


def guidellm_part(url: str, folder, workdir: str, sizes: dict) -> dict:
    """guidellm's sweep (`guidellm run`, guidellm >= 0.8) against the server: synthetic text prompts of prompt_len
    tokens asking for new_tokens; per rate, what it reports (request/s, output tok/s, TTFT and ITL median, p99)."""
    out = os.path.join(workdir, "guidellm.json")
    cmd = ["guidellm", "run", "--backend", f"kind=openai_http,target={url}",
           "--profile", f"kind=sweep,sweep_size={sizes['guidellm_rates']}",
           "--data", f"kind=synthetic_text,prompt_tokens={sizes['prompt_len']},output_tokens={sizes['new_tokens']}",
           "--tokenizer", f"kind=huggingface_auto,model={hf_tokenizer(folder, workdir)}",
           "--constraint", f"kind=max_duration,seconds={sizes['guidellm_seconds']}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    log("running " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"guidellm exited {r.returncode}: {(r.stderr or r.stdout)[-1000:]}"}
    rows = []
    for b in json.loads(Path(out).read_text())["benchmarks"]:
        m = b["metrics"]

        def stat(key, which="median"):
            d = m[key]["successful"]
            return d["percentiles"]["p99"] if which == "p99" else d[which]
        rows.append({"strategy": b["config"]["strategy"], "completed": m["request_totals"]["successful"],
                     "errored": m["request_totals"]["errored"], "req_s": stat("requests_per_second", "mean"),
                     "output_tok_s": stat("output_tokens_per_second", "mean"),
                     "ttft_ms_p50": stat("time_to_first_token_ms"),
                     "ttft_ms_p99": stat("time_to_first_token_ms", "p99"),
                     "itl_ms_p50": stat("inter_token_latency_ms"), "itl_ms_p99": stat("inter_token_latency_ms", "p99")})
    return {"output_path": out, "rows": rows}


def main() -> int:
    args, device, sizes, results, _ = start("bench_serve", __doc__, SIZES, TINY_SIZES)
    parts = selected(args, PARTS)
    # the real vocabulary when tiny too: guidellm's prompts are text, their ids up to the tokenizer's
    folder = checkpoint(args.workdir, "bf16", args.tiny, device, **({"vocab_size": 151936} if args.tiny else {}))
    c = max(sizes["concurrency"])
    failed = False
    server_parts = [p for p in parts if p in ("sweep", "poisson", "ttft")] + ["b1"]
    if "start" in parts:  # a first start (cached kernels from an earlier run count: say so) and a second one
        firsts = [serve_part(folder, device, sizes, [])["start_s"] for _ in range(2)]
        results["start_s"] = {"first": firsts[0], "second": firsts[1]}
        print_table("qwenlm serve start (to the first answered request)", ["start", "seconds"],
                    [["first (this run)", firsts[0]], ["second", firsts[1]]])
    # The server is a process of its own: the load runs here ("cpu": no fresh process needed; errors still caught)
    res = isolated("cpu", serve_part, folder, device, sizes, server_parts)
    results["server"] = res
    failed |= "error" in res
    if "load" in res:
        print_table("qwenlm serve under load (ms)", LOAD_COLUMNS, load_rows(res["load"]))
    if "int8_kv" in parts:
        sizes8 = {**sizes, "concurrency": [c]}
        results["server_int8_kv"] = isolated("cpu", serve_part, folder, device, sizes8, ["sweep"],
                                             ("--kv-cache-dtype", "int8"))
        failed |= "error" in results["server_int8_kv"]
    if "int4" in parts:  # batch-1 decode of a GPTQ Int4 folder, through HTTP and offline
        folder4 = checkpoint(args.workdir, "int4", args.tiny, device)
        results["server_int4"] = isolated("cpu", serve_part, folder4, device, sizes, ["b1"])
        failed |= "error" in results["server_int4"]
        if "offline" in parts:
            results["offline_int4"] = isolated(device, offline_part, folder4, device, sizes, "auto", ("b1",))
            failed |= "error" in results["offline_int4"]
    if "offline" in parts:
        results["offline"] = isolated(device, offline_part, folder, device, sizes, "auto", ("throughput", "b1", "ttft"))
        failed |= "error" in results["offline"]
        if "int8_kv" in parts:
            results["offline_int8_kv"] = isolated(device, offline_part, folder, device, sizes, "int8", ("throughput",))
            failed |= "error" in results["offline_int8_kv"]
        results["ratios"] = ratios(results, c)
        print_table("server / engine", ["figure", "server", "engine", "ratio", "server - engine"],
                    [[k, v["server"], v["engine"], f"{v['ratio']:.3f}", v["server"] - v["engine"]]
                     for k, v in results["ratios"].items()])
    if "guidellm" in parts:
        if shutil.which("guidellm") is None:
            log("guidellm is not installed: its part is skipped (pip install guidellm to run it)")
        else:
            server = Server(folder, device)
            try:
                results["guidellm"] = g = guidellm_part(server.url, folder, args.workdir, sizes)
                failed |= "error" in g
            finally:
                server.stop()
            if "rows" in g:
                print_table("guidellm sweep against qwenlm serve (ms)",
                            ["strategy", "done", "errors", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50",
                             "ITL p99"],
                            [[_strategy(r["strategy"]), r["completed"], r["errored"], r["req_s"], r["output_tok_s"],
                              r["ttft_ms_p50"], r["ttft_ms_p99"], r["itl_ms_p50"], r["itl_ms_p99"]] for r in g["rows"]])
    write_json(results, results_path("bench_serve", args.json))
    return 1 if failed else 0


def _strategy(s: dict) -> str:
    """guidellm's strategy record as a short name: "synchronous", "throughput", "constant 3.2/s"."""
    rate = s.get("rate")
    return s["type_"] + (f" {rate:.1f}/s" if isinstance(rate, (int, float)) else "")


def ratios(results: dict, c: int) -> dict:
    """server / engine for each figure both have (TTFT: the server's extra milliseconds too)."""
    pairs = {}
    srv, eng = results.get("server", {}), results.get("offline", {})
    load = srv.get("load", {}).get(f"concurrency {c}")
    if load and "output_tok_s" in eng:
        sizes = results["sizes"]
        pairs[f"{c} x {sizes['prompt_len']}/{sizes['new_tokens']} output tok/s"] = (load["output_tok_s"],
                                                                                   eng["output_tok_s"])
    s8 = results.get("server_int8_kv", {}).get("load", {}).get(f"concurrency {c}")
    e8 = results.get("offline_int8_kv", {})
    if s8 and "output_tok_s" in e8:
        pairs["same, int8 KV cache, output tok/s"] = (s8["output_tok_s"], e8["output_tok_s"])
    s4, e4 = results.get("server_int4", {}), results.get("offline_int4", {})
    if "b1_decode_tok_s" in s4 and "b1_decode_tok_s" in e4:
        pairs["batch-1 decode tok/s, GPTQ Int4"] = (s4["b1_decode_tok_s"], e4["b1_decode_tok_s"])
    for key, name in (("b1_decode_tok_s", "batch-1 decode tok/s"), ("ttft_short_ms", "TTFT short prompt (ms)"),
                      ("ttft_long_ms", "TTFT long prompt (ms)")):
        if key in srv and key in eng:
            pairs[name] = (srv[key], eng[key])
    return {k: {"server": s, "engine": e, "ratio": s / e if e else None} for k, (s, e) in pairs.items()}


if __name__ == "__main__":
    sys.exit(main())
