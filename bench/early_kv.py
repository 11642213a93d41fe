"""Batch-1 Int4 tok/s through the engine with the decode attention's first K/V tile read before its PDL wait
(attention.EARLY_KV) and without, alternately, three times each.

    cd bench && PYTHONPATH=..:. python early_kv.py
"""
import torch, bench_quant as B
from benchlib import copy_bandwidth, log
from qwenlm.config import ModelConfig
from qwenlm.kernels import attention
class A: compile = True; new_tokens = 256; prompt_len = 16; encode_len = 2048; max_batch = 128; num_blocks = None; tiny = False
bw = copy_bandwidth("cuda"); cfg = ModelConfig()
for early in [True, False] * 3:
    attention.EARLY_KV = early
    log(f"EARLY_KV {early}: {B.weights_run(cfg, 'int4', 'cuda', torch.float16, bw, A)['tok_s']:.1f} tok/s")
