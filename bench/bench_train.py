"""Fine-tuning speed and memory: qwenlm LoRA, Q-LoRA and full fine-tuning beside transformers + PEFT LoRA.

Each qwenlm row trains the way a user does: `qwenlm.train.trainer.Trainer(FinetuneConfig(...))` on a checkpoint folder
in the official layout (random weights at the Qwen-7B shape: bf16 as Qwen-7B-Chat, GPTQ Int4 as Qwen-7B-Chat-Int4)
and a data file of conversations of the given length, one sample per micro-batch (batch 1), 8 micro-batches per
optimizer step: the official iteration (batch 1, gradient accumulation 8). Defaults otherwise: gradient
checkpointing, AdamW (torchao 8-bit for full on CUDA), bf16, LoRA r 64 / alpha 16 on c_attn, c_proj, w1, w2.

  tokens/s         trained tokens / seconds of the timed iterations (after one warm-up iteration)
  s / iteration    seconds per optimizer step of 8 samples, as the official table gives it
  peak GB          torch's peak allocated memory of the run, weights included (CPU: peak RSS, a smoke figure)
  transformers     Qwen2ForCausalLM (the same function, weights mapped) + PEFT LoRA r 64 / alpha 16 on every block
                   linear, SDPA, gradient checkpointing, torch AdamW, batch 1, 8 micro-batches per step
  official A100    Qwen's README table (A100 80GB, flash-attention 2, DeepSpeed): GB / s per iteration

    python bench/bench_train.py               # H100: all parts at 1,024 / 4,096 / 8,192 tokens
    python bench/bench_train.py --tiny        # tiny shapes on the CPU: checks the script end to end
    python bench/bench_train.py --only lora,transformers   # parts: lora, qlora, full, transformers
    python bench/bench_train.py --only lora --lengths 16384,32768   # the longest sequences
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import checkpoint, isolated, log, peak_memory_gb, print_table, results_path, selected, start, write_json

SIZES = dict(lengths=[1024, 4096, 8192], samples_per_iter=8, iters=2)
TINY_SIZES = dict(lengths=[64], samples_per_iter=2, iters=1)
PARTS = ["lora", "qlora", "full", "transformers"]
# Qwen README, Qwen-7B on one A100 80GB (full: two), batch 1, grad-acc 8: (GB, s per iteration) by length
OFFICIAL_A100 = {"lora": {1024: (21.5, 2.8), 4096: (29.7, 10.1), 8192: (36.6, 21.3)},
                 "qlora": {1024: (12.3, 3.5), 4096: (16.9, 11.6), 8192: (23.5, 22.3)},
                 "full": {1024: (162.0, 4.5)}}  # 2 GPUs, ZeRO-3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def write_data(path: Path, length: int, count: int) -> Path:
    """`count` conversations of about `length` tokens (" hello" is one token; cut to max_len by the trainer)."""
    value = " ".join(["hello"] * length)
    path.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "user", "value": "Say hello."},
                                                                  {"from": "assistant", "value": value}]}
                                for i in range(count)]))
    return path


def qwenlm_part(folder: Path, method: str, length: int, sizes: dict, device: str) -> dict:
    from qwenlm.train.config import FinetuneConfig
    from qwenlm.train.trainer import Trainer
    n = sizes["samples_per_iter"]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data.json", length, n * (sizes["iters"] + 1))
        trainer = Trainer(FinetuneConfig(
            model=str(folder), data=[str(data)], output=str(Path(tmp) / "out"), method=method, max_len=length,
            on_long="truncate", grad_accum=n, epochs=1, progress=False, device=device,
            train_embeddings=None if method == "full" else False))
        trainer.train_step(trainer.plan[0][1])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        tokens = sum(trainer.train_step(group)[1] for _, group in trainer.plan[1:])
        _sync(device)
        wall = time.perf_counter() - t0
    iters = len(trainer.plan) - 1
    res = {"tok_s": tokens / wall, "s_per_iter": wall / iters, "peak_gb": peak_memory_gb(device), "tokens": tokens}
    log(f"qwenlm {method} at {length}: {res['tok_s']:,.0f} tok/s, {res['s_per_iter']:.2f} s/iteration, "
        f"peak {res['peak_gb']:.1f} GB")
    return res


def transformers_part(folder: Path, length: int, sizes: dict, device: str) -> dict:
    import hf_baseline
    from peft import LoraConfig, get_peft_model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = hf_baseline.load_qwen2(folder, device, dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, betas=(0.9, 0.95),
                            weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    n = sizes["samples_per_iter"]

    def iteration():
        for _ in range(n):
            ids = torch.randint(0, 4096, (1, length), generator=g).to(device)
            (model(input_ids=ids, labels=ids).loss / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    iteration()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(sizes["iters"]):
        iteration()
    _sync(device)
    wall = time.perf_counter() - t0
    res = {"tok_s": sizes["iters"] * n * length / wall, "s_per_iter": wall / sizes["iters"],
           "peak_gb": peak_memory_gb(device), "tokens": sizes["iters"] * n * length}
    log(f"transformers + PEFT LoRA at {length}: {res['tok_s']:,.0f} tok/s, {res['s_per_iter']:.2f} s/iteration, "
        f"peak {res['peak_gb']:.1f} GB")
    return res


def main() -> int:
    args, device, sizes, results, _ = start("bench_train", __doc__, SIZES, TINY_SIZES, lambda ap: ap.add_argument(
        "--lengths", help="comma-separated sequence lengths (default 1,024 / 4,096 / 8,192): 2048 for full, 32768"))
    if args.lengths:
        sizes = results["sizes"] = dict(sizes, lengths=[int(n) for n in args.lengths.split(",")])
    parts = selected(args, PARTS)
    # the real vocabulary even when tiny: training data goes through the Qwen tokenizer (ChatML ids ~151,644)
    shape = {"vocab_size": 151936} if args.tiny else {}
    folders = {kind: checkpoint(args.workdir, kind, args.tiny, device, **shape)
               for kind in sorted({"int4" if p == "qlora" else "bf16" for p in parts})}
    rows = results["rows"] = {}
    for part in parts:
        folder = folders["int4" if part == "qlora" else "bf16"]
        for length in sizes["lengths"]:
            if part == "transformers":
                r = isolated(device, transformers_part, folder, length, sizes, device)
            else:
                r = isolated(device, qwenlm_part, folder, part, length, sizes, device)
            rows[f"{part} {length}"] = {"part": part, "length": length, **r}
    write_json(results, results_path("bench_train", args.json))

    table = []
    for key, r in rows.items():
        hf = rows.get(f"transformers {r['length']}", {})
        ratio = r["tok_s"] / hf["tok_s"] if "tok_s" in r and "tok_s" in hf and r["part"] != "transformers" else None
        gb, s = OFFICIAL_A100.get(r["part"], {}).get(r["length"], (None, None))
        table.append([key, r.get("tok_s"), r.get("s_per_iter"), r.get("peak_gb"),
                      None if ratio is None else f"{ratio:.2f}x", gb, s, r.get("error", "")[:60]])
    print_table(f"fine-tuning, batch 1, {sizes['samples_per_iter']} samples per iteration: "
                f"{results['header']['device']}, qwenlm {results['header']['qwenlm']}",
                ["part / tokens", "tok/s", "s / iteration", "peak GB", "vs transformers", "official A100 GB",
                 "official A100 s", "note"], table)
    return int(any("error" in r for r in rows.values()))  # each error is logged and in the table's note


if __name__ == "__main__":
    sys.exit(main())
