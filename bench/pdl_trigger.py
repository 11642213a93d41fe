"""Where each kernel lets the next one launch (programmatic dependent launch), through the engine: batch-1 Int4 tok/s
with the fused GEMVs triggering at their start or after their first two tiles' arithmetic (gptq_fused LATE=3),
and the decode attention triggering at its start or after its loop (attention.MMA_LATE), twice each.

    cd bench && PYTHONPATH=..:. python pdl_trigger.py
"""
import torch, bench_quant as B
from benchlib import copy_bandwidth, log
from qwenlm.config import ModelConfig
from qwenlm.kernels import gptq_fused, attention
class A: compile = True; new_tokens = 256; prompt_len = 16; encode_len = 2048; max_batch = 128; num_blocks = None; tiny = False
bw = copy_bandwidth("cuda"); cfg = ModelConfig()
for fused, late in [((512,64,2,4,3,1,0,3), False), ((512,64,2,4,3,1,0,3), True), ((512,64,2,4,3), True), ((512,64,2,4,3), False)] * 2:
    gptq_fused.FUSED_DEFAULT = fused; attention.MMA_LATE = late
    log(f"fused {fused} attention late {late}: {B.weights_run(cfg, 'int4', 'cuda', torch.float16, bw, A)['tok_s']:.1f} tok/s")
