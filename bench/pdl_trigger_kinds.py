"""Batch-1 Int4 tok/s through the engine with the fused GEMVs of one kind (c_attn, gate_up, or the two c_proj) letting
the next kernel launch at another point: 0 right after their wait, 1 after the first two tiles (the default), 2 at
the start of the run's last column-block segment, 3 after its last tile.

    cd bench && PYTHONPATH=..:. python pdl_trigger_kinds.py
"""
import torch

import bench_quant as B
from benchlib import copy_bandwidth, log
from qwenlm.config import ModelConfig
from qwenlm.kernels import gptq_fused


class A:
    compile = True
    new_tokens = 256
    prompt_len = 16
    encode_len = 2048
    max_batch = 128
    num_blocks = None
    tiny = False


bw = copy_bandwidth("cuda")
cfg = ModelConfig()
base = {"attn": 1, "gate_up": 1, "proj": 1}
variants = [{}, {"attn": 0}, {"attn": 2}, {"attn": 3}, {"proj": 2}, {"proj": 3}, {"gate_up": 2}, {"gate_up": 3},
            {"proj": 0}, {}]
for v in variants:
    gptq_fused.TRIGGER = dict(base, **v)
    log(f"trigger {gptq_fused.TRIGGER}: {B.weights_run(cfg, 'int4', 'cuda', torch.float16, bw, A)['tok_s']:.1f} tok/s")
