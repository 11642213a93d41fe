"""The baseline: transformers' own Qwen2ForCausalLM (SDPA attention, `generate`) with the weights of a Qwen v1
folder mapped onto it (c_attn split into q/k/v, w2 -> gate, w1 -> up, mlp.c_proj -> down): the same function up
to seq_length (tests/test_model.py checks it). Timed the way benchlib times the engine."""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch

from benchlib import log, peak_memory_gb, prompts, spread


def load_qwen2(folder: Path, device: str, dtype: torch.dtype):
    """Qwen2ForCausalLM built on `device` in `dtype`, each tensor of the folder copied into it as it is read."""
    from safetensors import safe_open
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = json.loads((folder / "config.json").read_text())
    hf_cfg = Qwen2Config(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                         intermediate_size=c["intermediate_size"] // 2, num_hidden_layers=c["num_hidden_layers"],
                         num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_attention_heads"],
                         rms_norm_eps=c["layer_norm_epsilon"], max_position_embeddings=c["seq_length"],
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": c["rotary_emb_base"]})
    hf_cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    for hf_name, t in _mapped(name, f.get_tensor(name)):
                        params[hf_name].copy_(t)
                        filled.add(hf_name)
    missing = set(params) - filled
    assert not missing, f"not in {folder}: {sorted(missing)[:3]}"
    return model


def _mapped(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    top = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return [(top[name], t)]
    i, rest = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name).groups()
    p = f"model.layers.{i}."
    if rest.startswith("attn.c_attn."):  # [q | k | v] rows
        kind = rest.rpartition(".")[2]
        return [(f"{p}self_attn.{n}_proj.{kind}", part) for n, part in zip("qkv", t.chunk(3, dim=0))]
    return [(p + {"attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w2.weight": "mlp.gate_proj.weight",
                  "mlp.w1.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight",
                  "ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight"}[rest], t)]


class _TokenClock:
    """A generate() streamer that notes when each token reaches it (the first call is the prompt)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def put(self, value):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate(model, ids: list[list[int]], new_tokens: int, streamer=None):
    x = torch.tensor(ids, device=model.device)
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                          streamer=streamer)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def figures(folder: Path, device: str, sizes: dict, batch: bool = True) -> dict:
    """Batch-1 decode tok/s (sizes["hf_b1_new"] tokens, between the first token and the last), peak memory
    encoding sizes["encode_len"] tokens, and with batch=True TTFT per sizes["ttft_lens"] and the throughput of
    sizes["hf_batch"] prompts of sizes["prompt_len"] with sizes["new_tokens"] new tokens each."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = time.time()
    model = load_qwen2(folder, device, dtype)
    res = {"load_s": time.time() - t}
    log(f"transformers: Qwen2ForCausalLM loaded from {folder.name} in {res['load_s']:.0f} s")
    with torch.no_grad():
        _generate(model, prompts(1, 16, 1), 4)  # warm-up
        rates = []
        for r in range(sizes["repeats"]):
            clock = _TokenClock(device)
            _generate(model, prompts(1, 16, 10 + r), sizes["hf_b1_new"], clock)
            tokens = clock.times[1:]
            rates.append((len(tokens) - 1) / (tokens[-1] - tokens[0]))
        res["b1_decode_tok_s"] = spread(rates)
        log(f"transformers batch-1 decode: {statistics.median(rates):.1f} tok/s ({sizes['hf_b1_new']} new tokens)")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _generate(model, prompts(1, sizes["encode_len"], 2), 1)
        res["peak_memory_gb"] = peak_memory_gb(device)
        log(f"transformers peak memory encoding {sizes['encode_len']} tokens: {res['peak_memory_gb']:.2f} GB")
        if not batch:
            return res
        for which, n in sizes["ttft_lens"].items():
            times = []
            for r in range(sizes["ttft_repeats"]):
                ids = prompts(1, n, 100 + r)
                _sync(device)
                t = time.perf_counter()
                _generate(model, ids, 1)
                _sync(device)
                times.append(time.perf_counter() - t)
            res[f"ttft_{which}_ms"] = spread([x * 1e3 for x in times])
            log(f"transformers TTFT {n} tokens: {statistics.median(times) * 1e3:.1f} ms")
        ids = prompts(sizes["hf_batch"], sizes["prompt_len"], 3)
        _sync(device)
        t = time.perf_counter()
        out = _generate(model, ids, sizes["new_tokens"])
        _sync(device)
        wall = time.perf_counter() - t
        made = (out.shape[1] - sizes["prompt_len"]) * len(ids)
        res["batch"] = {"requests": len(ids), "output_tok_s": made / wall, "wall_s": wall, "tokens": made}
        log(f"transformers {len(ids)} x {sizes['prompt_len']}/{sizes['new_tokens']}: {made / wall:.0f} output tok/s")
    return res
