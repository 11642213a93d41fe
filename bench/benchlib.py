"""What the benchmark scripts share: the run header, the copy bandwidth and the bound it gives, timing the engine
through its public API, each measurement in a fresh process, the side-by-side table, results as JSON, and random
checkpoint folders in the official layout at the real shape, cached by shape under --workdir.

The timed code only uses qwenlm's public API (qwenlm.load, qwenlm.engine.LLM / EngineConfig / SamplingParams),
so the same script times an older checkout: PYTHONPATH=<checkout> python bench/bench_engine.py (its folders
must already be in --workdir: they are written with this checkout's qwenlm.testing).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# `python bench/<script>.py` from a checkout finds its qwenlm without installing it; an installed qwenlm or one on
# PYTHONPATH comes first (appended, not prepended)
sys.path.append(str(Path(__file__).resolve().parent.parent))
T0 = float(os.environ.setdefault("QWENLM_BENCH_T0", str(time.time())))  # inherited: one clock for every part
RESULTS_DIR = Path(__file__).with_name("results")  # gitignored

# Shapes: the real one is ModelConfig()'s defaults (Qwen-7B); the tiny one has whole 128-wide heads and GPTQ
# groups, so the Int4 / Int8 folders take the same kernels as the real ones.
TINY_SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, kv_channels=128,
                  intermediate_size=768)
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
              "intermediate_size", "seq_length", "max_position_embeddings")
GPTQ_CONFIG = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
               "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
               "quant_method": "gptq"}  # spec §10.1: the official Int4 / Int8 releases
FOLDER_VERSION = 1  # bump when the folders written change, so cached ones are not reused


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def arg_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks that the script runs")
    ap.add_argument("--workdir", default="/tmp/qwenlm-bench", help="where checkpoint folders are written and reused")
    ap.add_argument("--json", help="results file (default bench/results/<name>-<date>.json; a PNG goes beside it)")
    ap.add_argument("--only", help="comma-separated parts to run (default: all; the script's docstring names them)")
    return ap


def start(name: str, doc: str, sizes: dict, tiny_sizes: dict, add_args=None):
    """Parse the arguments (add_args(parser) adds a script's own), log the run header and the copy bandwidth:
    (args, device, sizes, results, bandwidth)."""
    ap = arg_parser(doc)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    device = device_of(args)
    sizes = tiny_sizes if args.tiny else sizes
    results = {"name": name, "header": header(device), "sizes": sizes}
    log(" | ".join(f"{k} {v}" for k, v in results["header"].items()))
    bw = copy_bandwidth(device)
    results["copy_bandwidth_gb_s"] = bw / 1e9
    log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    return args, device, sizes, results, bw


def selected(args, parts: list[str]) -> list[str]:
    """The parts --only names (all by default), in the script's order; an unknown name is an error."""
    if not args.only:
        return parts
    asked = args.only.split(",")
    unknown = [p for p in asked if p not in parts]
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {', '.join(unknown)}; the parts are {', '.join(parts)}")
    return [p for p in parts if p in asked]


def device_of(args) -> str:
    if args.tiny:
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and on a busy CPU they wait on each other
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- header and the bound

def _qwenlm_commit() -> str:
    """Commit (and whether modified) of the qwenlm that is imported, which PYTHONPATH may point elsewhere."""
    import qwenlm
    where = os.path.dirname(os.path.dirname(os.path.abspath(qwenlm.__file__)))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "qwenlm"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"unknown ({where})"
    return f"{head or 'unknown'}{' (modified)' if dirty else ''} ({where})"


def header(device: str) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None
    cuda = device == "cuda"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
            "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else None,
            "python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "transformers": version("transformers"), "qwenlm": _qwenlm_commit()}


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy (the achievable streaming rate); median of
    10 timed copies after 3 warm-ups. CPU: a nominal 50 GB/s, only so --tiny runs print a bound."""
    if device != "cuda":
        return 50e9
    a = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    bw = 2 * a.numel() * a.element_size() / statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return bw


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor of a folder's *.safetensors files, from their headers (nothing is loaded)."""
    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            meta = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in meta.items() if k != "__metadata__"})
    return sizes


def weight_bytes_per_step(folder: Path, batch: int = 1) -> int:
    """Bytes of weights a decode step reads: every tensor but the embedding table (one row per sequence) and g_idx
    (trivial groups are not read): packed weights, scales, zeros, biases, norms, lm_head."""
    sizes = safetensors_bytes(folder)
    cfg = json.loads((folder / "config.json").read_text())
    row = sizes["transformer.wte.weight"] // cfg["vocab_size"]
    return sum(v for k, v in sizes.items() if k != "transformer.wte.weight" and not k.endswith(".g_idx")) + batch * row


def kv_bytes_per_token(folder: Path, kv_cache_dtype: str = "auto") -> int:
    """KV-cache bytes of one token over all layers: K and V rows in the model dtype (2 bytes), or int8 rows plus a
    float32 (scale, zero) pair per head."""
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_head = head_dim + 8 if kv_cache_dtype == "int8" else 2 * head_dim
    return 2 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * per_head


def decode_bound(bw: float, folder: Path, batch: int, context: float, kv_cache_dtype: str = "auto") -> float:
    """Tokens/s if a decode step took only the time to read its bytes at the copy rate: weights once per step plus
    each sequence's KV cache at `context` tokens (the run's mean)."""
    step = weight_bytes_per_step(folder, batch) + batch * context * kv_bytes_per_token(folder, kv_cache_dtype)
    return batch * bw / step


# ---------------------------------------------------------------- checkpoint folders

def checkpoint(workdir: str, kind: str, tiny: bool, device: str, **shape) -> Path:
    """A random checkpoint folder in the official layout, written once per (kind, shape) and reused: kind "bf16"
    (as Qwen-7B-Chat: bf16 tensors, 8 shards + index) or "int4" / "int8" (as Qwen-7B-Chat-Int4 / -Int8: GPTQ
    tensors, fp16 elsewhere). shape: config values over the real shape (or TINY_SHAPE with tiny)."""
    from qwenlm.config import ModelConfig
    real = ModelConfig()
    values = {**{k: getattr(real, k) for k in SHAPE_KEYS}, **(TINY_SHAPE if tiny else {}), **shape}
    if kind == "bf16":
        extra, dtype = {}, torch.bfloat16
    else:
        extra, dtype = {"fp16": True, "quantization_config": {**GPTQ_CONFIG, "bits": int(kind[3:])}}, torch.float16
    key = json.dumps([FOLDER_VERSION, kind, values, extra], sort_keys=True)
    name = f"qwen-{kind}-{values['num_hidden_layers']}x{values['hidden_size']}-" \
           f"{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    out = Path(workdir) / name
    if (out / "config.json").is_file():
        log(f"checkpoint {out} (cached)")
        return out
    from qwenlm.testing import make_tiny_checkpoint
    if "num_shards" not in inspect.signature(make_tiny_checkpoint).parameters:
        # an older qwenlm.testing writes no GPTQ tensors (and draws 7B numbers on the CPU): it would mislabel them
        raise RuntimeError(f"this qwenlm cannot write {kind} folders; write them once into {workdir} with a "
                           "current checkout (same --workdir)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{name}.incomplete-{os.getpid()}"  # renamed into place only once complete
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    try:
        make_tiny_checkpoint(tmp, layout="sharded", num_shards=2 if tiny else 8, dtype=dtype, device=device,
                             **values, **extra)
        try:
            os.replace(tmp, out)
        except OSError:  # another process put it there meanwhile
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    gb = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    log(f"checkpoint {out}: {gb:.1f} GB written in {time.time() - t:.0f} s")
    return out


# ---------------------------------------------------------------- timing through the public API

def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids (below 4096, inside every vocabulary here; which ids does not change a timing); distinct
    seeds give prompts the prefix cache has not seen."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (length,), generator=g).tolist() for _ in range(n)]


def greedy(max_tokens: int):
    from qwenlm.engine import SamplingParams
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def decode_rate(engine, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of one request between its first token and its last: decode steps only (step() returns once the
    step's tokens are on the host, so the clock sees the device's time)."""
    rid = engine.add_request(None, prompt, greedy(new_tokens))
    seen = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                seen.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    return (n1 - n0) / (t1 - t0)


def time_to_first_token(engine, prompt: list[int]) -> float:
    """Seconds from add_request to the first token back, the engine otherwise idle."""
    t0 = time.perf_counter()
    engine.add_request(None, prompt, greedy(1))
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and any(o.outputs[0].token_ids for o in outs):
            first = time.perf_counter() - t0
    return first


def throughput(engine, batch: list[list[int]], new_tokens: int) -> dict:
    """All requests at once through LLMEngine.generate: output tokens / wall seconds of the whole run."""
    t0 = time.perf_counter()
    outs = engine.generate(batch, greedy(new_tokens))
    wall = time.perf_counter() - t0
    made = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tok_s": made / wall, "wall_s": wall, "tokens": made, "engine": engine.stats()}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def peak_memory_gb(device: str) -> float:
    """CUDA: torch's peak allocated bytes since the last reset. CPU: the process's peak RSS (a smoke figure)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def isolated(device: str, fn, *args):
    """fn(*args) in a fresh process on a GPU, so each measurement starts from an empty device (the KV pool takes
    90% of it, and its peak memory is its own); on the CPU in this process (nothing to isolate, and it is fast).
    Exceptions come back as {"error": ...}, so one failing part leaves the others' figures."""
    try:
        if device != "cuda":
            return fn(*args)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    except Exception as e:  # noqa: BLE001 (reported in the table and the JSON, and the exit code)
        log(f"{fn.__name__} failed: {type(e).__name__}: {str(e)[:1000]}")
        return {"error": f"{type(e).__name__}: {str(e)[:1000]}"}


# ---------------------------------------------------------------- reporting

def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
    left = (0, len(columns) - 1) if columns[-1] == "note" else (0,)  # names and notes left, numbers right
    line = lambda r: " | ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    print(f"\n==== {title} ====\n{line(columns)}\n" + "-+-".join("-" * w for w in widths))
    print("\n".join(line(r) for r in cells), flush=True)


def results_path(name: str, given: str | None) -> Path:
    if given:
        return Path(given)
    return RESULTS_DIR / f"{name}-{datetime.date.today().isoformat()}.json"


def exit_code(parts: dict) -> int:
    """1 if a part failed (its {"error": ...}), after naming the failures on stderr; else 0."""
    errors = {k: v["error"] for k, v in parts.items() if "error" in v}
    if errors:
        print(f"failed parts: {errors}", file=sys.stderr)
    return 1 if errors else 0


def write_json(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    log(f"wrote {path}")
    return path
