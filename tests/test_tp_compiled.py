"""Tensor parallelism through the engine with the compiled regions (the GPU default): two gloo ranks each compile
the decode and prefill regions with Inductor, their all-reduces and the logits' all-gather traced inside as
functional collectives, and give the greedy ids and logprobs of one eager process."""

import torch

from qwenlm.engine import LLM
from qwenlm.engine.compiled_decode import CompiledDecode
from qwenlm.sampling import SamplingParams
from qwenlm.testing import make_tiny_checkpoint


def test_compiled_regions_with_collectives_give_the_ids_and_logprobs_of_one_process(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, bf16=True, seed=7, seq_length=16)
    prompts = [[151644, 872, 198, 108386, 151645, 198], list(range(1000, 1040)), [9707, 11, 1879]]
    # batch 3, then 2, then batch 1 (the static batch-1 regions) as the replies end
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=True) for n in (4, 9, 6)]
    kw = dict(dtype=torch.float32, num_blocks=64, block_size=4)
    want = [r.outputs[0] for r in LLM(str(folder), **kw).generate(prompts, params)]
    llm = LLM(str(folder), tensor_parallel_size=2, compile_decode=True, **kw)
    try:
        assert isinstance(llm.runner._decode_forward, CompiledDecode)
        got = [r.outputs[0] for r in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
    for g, w in zip(got, want):  # fp32; Inductor's fused kernels and the all-reduce may each round differently
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
