"""`quantize_model`: GPTQ over a Qwen checkpoint, block by block, written as an official-layout Int4/Int8 folder.

As AutoGPTQ with Qwen's run_gptq.py settings: each calibration sample runs alone (no padding); inside each
block the linears are quantized in true-sequential order [c_attn], [attn.c_proj], [w1, w2], [mlp.c_proj],
each group seeing the outputs of the already-quantized ones; the next block is fed the quantized block's
outputs. The folder is written under a hidden ".<name>.incomplete-<pid>" sibling and renamed into place
only once complete, so an interrupted run never leaves a folder that looks finished; a run that was killed
outright leaves that sibling behind, and the next run for the same output removes it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwenlm.config import ModelConfig
from qwenlm.files import atomic_dir, save_safetensors, write_text
from qwenlm.loading import check_device
from qwenlm.model.loader import checkpoint_files, load_model
from qwenlm.model.qwen import QWenLMHeadModel, logn_scale, ntk_alpha
from qwenlm.model.quant import SEQUENTIAL_GROUPS, pack_cols, pack_rows
from qwenlm.quantize.calib import load_calibration
from qwenlm.quantize.gptq import HessianAccumulator, QuantizedWeight, gptq_quantize
from qwenlm.tokenizer import Tokenizer


class _CausalAttention:
    """Attention context for one whole sequence, no cache (calibration forward)."""

    def attend(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)


def _rope_inputs(model: QWenLMHeadModel, T: int, device):
    """cos, sin, q_scale for one sequence of T tokens, as QWenLMHeadModel.forward computes them."""
    cfg = model.config
    alpha = ntk_alpha(T, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
    positions = torch.arange(T, device=device)[None]
    freqs = positions[..., None].float() * model.inv_freq([alpha], device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    q_scale = None
    if cfg.use_logn_attn and T > cfg.seq_length:
        q_scale = logn_scale(positions, cfg.seq_length)[:, :, None, None]
    return emb.cos(), emb.sin(), q_scale


@torch.no_grad()
def gptq_quantize_blocks(model: QWenLMHeadModel, samples: list[list[int]], bits: int, group_size: int,
                         act_order: bool = False, damp: float = 0.01, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize every block linear in place (weights replaced by their dequantized values); returns the results."""
    device = model.lm_head.weight.device
    ctx = _CausalAttention()
    hidden = [model.transformer.wte(torch.tensor([s], device=device)) for s in samples]  # each [1,T,H]
    extras = [_rope_inputs(model, len(s), device) for s in samples]
    results: dict[str, QuantizedWeight] = {}
    blocks = model.transformer.h
    for i, block in enumerate(tqdm(blocks, desc=f"GPTQ int{bits}", unit="layer", disable=not progress)):
        for group in SEQUENTIAL_GROUPS:
            linears = {name: block.get_submodule(name) for name in group}
            hessians = {name: HessianAccumulator(lin.in_features, device) for name, lin in linears.items()}
            hooks = [lin.register_forward_hook(lambda m, inp, out, h=hessians[name]: h.add(inp[0]))
                     for name, lin in linears.items()]
            try:
                for x, (cos, sin, q_scale) in zip(hidden, extras):
                    block(x, cos, sin, q_scale, ctx)
            finally:
                for h in hooks:
                    h.remove()
            for name, lin in linears.items():
                qw = gptq_quantize(lin.weight, hessians[name].H, bits, group_size, damp=damp, act_order=act_order)
                qw.scales = qw.scales.half().float()  # what the file will hold, so later layers see the same
                lin.weight.copy_(qw.dequantize().to(lin.weight.dtype))
                results[f"transformer.h.{i}.{name}"] = QuantizedWeight(*(t.cpu() for t in (qw.q, qw.scales, qw.zeros, qw.g_idx)))
            del hessians
        hidden = [block(x, cos, sin, q_scale, ctx) for x, (cos, sin, q_scale) in zip(hidden, extras)]
    return results


def quantization_config(bits: int, group_size: int, act_order: bool, damp: float) -> dict:
    """The official Int4/Int8 config.json block (spec §10.1), key order kept."""
    return {"bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": act_order,
            "static_groups": False, "sym": True, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq"}


def gptq_state_dict(model: QWenLMHeadModel, results: dict[str, QuantizedWeight], bits: int) -> dict[str, torch.Tensor]:
    """Tensors in the AutoGPTQ cuda-old layout for the quantized linears, fp16 for everything else."""
    state = {}
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in results:
            continue
        state[name] = t.detach().to("cpu", torch.float16).contiguous()
    for module, qw in results.items():
        lin = model.get_submodule(module)
        state[f"{module}.qweight"] = pack_rows(qw.q.t().contiguous(), bits)  # [K*b/32, N]
        state[f"{module}.qzeros"] = pack_cols(qw.zeros - 1, bits)  # stored as zero-1
        state[f"{module}.scales"] = qw.scales.half().contiguous()
        state[f"{module}.g_idx"] = qw.g_idx.int().contiguous()
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
        state[f"{module}.bias"] = bias.detach().to("cpu", torch.float16).contiguous()  # AutoGPTQ always has one
    return state


def _write_folder(tmp: Path, model_dir: Path, state: dict, qconfig: dict) -> None:
    weight_files = {p.name for p in checkpoint_files(model_dir)}
    skip = weight_files | {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                           "quantize_config.json"}
    for src in model_dir.iterdir():  # tokenizer, generation config, code files: copied unchanged
        if src.is_file() and src.name not in skip:
            shutil.copy2(src, tmp / src.name)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config.update({"fp16": True, "bf16": False, "fp32": False, "torch_dtype": "float16",
                   "quantization_config": qconfig})
    write_text(tmp / "config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    qc = {k: v for k, v in qconfig.items() if k != "quant_method"}
    write_text(tmp / "quantize_config.json", json.dumps(qc, indent=2) + "\n")
    save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(out_dir: Path) -> None:
    """Remove the ".<name>.incomplete-<pid>" folders that killed runs for this same output left behind, once
    their process has ended. Only that exact name pattern is touched, never anything else in the folder."""
    prefix = f".{out_dir.name}.incomplete-"
    for path in sorted(out_dir.parent.glob(glob.escape(prefix) + "*")):
        pid = path.name[len(prefix):]
        if not pid.isdigit() or int(pid) <= 0 or path.is_symlink() or not path.is_dir():
            continue
        if int(pid) != os.getpid() and _process_alive(int(pid)):
            print(f"qwenlm quantize: {path} belongs to a run still in progress (process {pid}); left alone",
                  file=sys.stderr)
            continue
        shutil.rmtree(path)
        print(f"qwenlm quantize: removed {path}, the partial output of an earlier run that did not finish "
              f"(process {pid} is gone)", file=sys.stderr)


def quantize_model(model_dir, calib_texts_or_conversations, bits: int, group_size: int, out_dir,
                   act_order: bool = False, damp: float = 0.01, max_len: int = 8192, max_samples: int | None = None,
                   device: str | None = None, progress: bool = True) -> Path:
    """GPTQ-quantize the checkpoint folder `model_dir` into `out_dir` (official Int4/Int8 layout). Returns out_dir.

    calib_texts_or_conversations: a .json/.jsonl/.txt path, or a list of strings / {"conversations": [...]}.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        raise ValueError(f"group_size must be -1 or a positive multiple of 32, got {group_size}")
    if out_dir.exists():
        raise FileExistsError(f"output folder {out_dir} already exists; choose a new --out")
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(f"parent folder of the output {out_dir.parent} does not exist")
    if ModelConfig.from_file(model_dir / "config.json").quantization_config:
        raise ValueError(f"{model_dir}: already quantized (config.json has quantization_config)")
    check_device(device)
    remove_stale_partials(out_dir)
    tok = Tokenizer.from_folder(model_dir)
    samples = load_calibration(calib_texts_or_conversations, tok, max_len=max_len, max_samples=max_samples)
    if progress:
        print(f"qwenlm quantize: calibrating on {len(samples)} samples, {sum(map(len, samples))} tokens",
              file=sys.stderr)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with atomic_dir(out_dir, "qwenlm quantize") as tmp:
        model = load_model(model_dir, device, dtype, progress=progress)
        results = gptq_quantize_blocks(model, samples, bits, group_size, act_order, damp, progress)
        state = gptq_state_dict(model, results, bits)
        _write_folder(tmp, model_dir, state, quantization_config(bits, group_size, act_order, damp))
    return out_dir


def run_quantize(model: str, data: str, bits: int = 4, group_size: int = 128, out: str | None = None,
                 act_order: bool = False, damp: float = 0.01, max_len: int = 8192,
                 max_samples: int | None = None, device: str | None = None) -> Path:
    """Keyword form used by the `qwenlm quantize` command."""
    if out is None:
        raise ValueError("an output folder (--out) is required")
    return quantize_model(model, data, bits, group_size, out, act_order=act_order, damp=damp, max_len=max_len,
                          max_samples=max_samples, device=device)


def main(args) -> int:
    """Entry for an argparse Namespace with model, data, bits, group_size, out, act_order (+ optional damp,
    max_len, max_samples, device). Returns a process exit code."""
    try:
        path = run_quantize(args.model, args.data, args.bits, args.group_size, args.out, args.act_order,
                            getattr(args, "damp", 0.01), getattr(args, "max_len", 8192),
                            getattr(args, "max_samples", None), getattr(args, "device", None))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # they name the file, sample or setting: no traceback
        print(f"qwenlm quantize: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
