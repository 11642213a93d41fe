"""Tensor parallelism at the model level (qwenlm.parallel): the sharding plan against the Megatron layout and the
GPTQ definition (spec §10.4), shard -> unshard giving back every tensor, clear errors for a size that does not
split, and two gloo processes computing the same logits and greedy ids as one process."""

import json
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwenlm.config import ModelConfig
from qwenlm.engine.fusion import fuse_gate_up
from qwenlm.model.loader import CheckpointError, load_model
from qwenlm.model.qwen import DenseKVCache, ntk_alpha
from qwenlm.model.quant import dequantize_weight
from qwenlm.parallel.model import check_gpus, load_tp_model
from qwenlm.parallel.tp import TPError, TPPlan, shard_state_dict, unshard_state_dict
from qwenlm.testing import TINY, make_tiny_checkpoint, random_state_dict, size_config

GPTQ = {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}
# the MLP is 3 groups wide: 2 ranks hold 2 and 1 groups (as Qwen-14B's 107 groups of 128 split 54 / 53)
GPTQ_SHAPE = dict(intermediate_size=192, fp16=True, quantization_config=GPTQ)


def _gptq_cfg(**qc):
    return ModelConfig.from_dict({**TINY, **GPTQ_SHAPE, "quantization_config": {**GPTQ, **qc}})


def _act_order_state(cfg):
    """A random Int4 state whose g_idx assign inputs to groups in a shuffled order (desc_act checkpoints)."""
    state = random_state_dict(cfg, seed=2)
    gen = torch.Generator().manual_seed(3)
    for name in [n for n in state if n.endswith(".g_idx")]:
        state[name] = state[name][torch.randperm(state[name].numel(), generator=gen)].contiguous()
    return state


CASES = {
    "dense": lambda: (ModelConfig.from_dict(TINY), random_state_dict(ModelConfig.from_dict(TINY), seed=1)),
    "int4": lambda: (_gptq_cfg(), random_state_dict(_gptq_cfg(), seed=1)),
    "int8": lambda: (_gptq_cfg(bits=8), random_state_dict(_gptq_cfg(bits=8), seed=1)),
    "int4-act-order": lambda: (_gptq_cfg(desc_act=True), _act_order_state(_gptq_cfg(desc_act=True))),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_shard_then_unshard_gives_back_every_tensor(case, world):
    cfg, state = CASES[case]()
    if case != "dense" and world == 4:
        # heads of 32 inputs and an MLP 4 groups wide: one group of each per rank
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "hidden_size": 128, "kv_channels": 32, "intermediate_size": 256})
        state = _act_order_state(cfg) if "act-order" in case else random_state_dict(cfg, seed=1)
    shards = [shard_state_dict(state, cfg, r, world) for r in range(world)]
    back = unshard_state_dict(shards, cfg)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # every rank holds less than the whole of each split tensor
    assert shards[1]["lm_head.weight"].shape[0] == cfg.vocab_size // world


def test_dense_shards_are_the_megatron_layout():
    """Rank r's c_attn rows are its heads' Q, K and V rows (bias too); c_proj its heads' input columns;
    w1 / w2 rows and mlp.c_proj columns the same run of the MLP; wte / lm_head a run of vocabulary rows."""
    cfg, state = CASES["dense"]()
    H, d, hl = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads // 2
    shard = shard_state_dict(state, cfg, 1, 2)
    p = "transformer.h.1."
    w, b = state[p + "attn.c_attn.weight"], state[p + "attn.c_attn.bias"]
    rows = [j * H + hl * d + i for j in range(3) for i in range(hl * d)]
    assert torch.equal(shard[p + "attn.c_attn.weight"], w[rows]) and torch.equal(shard[p + "attn.c_attn.bias"], b[rows])
    assert torch.equal(shard[p + "attn.c_proj.weight"], state[p + "attn.c_proj.weight"][:, hl * d:])
    f = cfg.ffn_dim // 2
    assert torch.equal(shard[p + "mlp.w2.weight"], state[p + "mlp.w2.weight"][f:])
    assert torch.equal(shard[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.weight"][:, f:])
    assert torch.equal(shard["transformer.wte.weight"], state["transformer.wte.weight"][cfg.vocab_size // 2:])
    assert torch.equal(shard[p + "ln_1.weight"], state[p + "ln_1.weight"])


@pytest.mark.parametrize("case", ["int4", "int8", "int4-act-order"])
def test_gptq_shards_dequantize_to_slices_of_the_whole_weight(case):
    """The GPTQ definition (spec §10.4) applied to each rank's tensors gives that rank's slice of the dequantized
    whole layer: columns for c_attn (per Q/K/V block) and w1 / w2, input rows for the two c_proj."""
    cfg, state = CASES[case]()
    bits = cfg.quantization_config["bits"]
    shards = [shard_state_dict(state, cfg, r, 2) for r in range(2)]

    def deq(sd, mod):
        return dequantize_weight(sd[mod + ".qweight"], sd[mod + ".qzeros"], sd[mod + ".scales"], sd[mod + ".g_idx"],
                                 bits)  # W_T [K, N]

    p = "transformer.h.0."
    H, half = cfg.hidden_size, cfg.hidden_size // 2
    whole = {m: deq(state, p + m) for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.c_proj")}
    for r, sd in enumerate(shards):
        qkv = torch.cat([whole["attn.c_attn"][:, j * H + r * half:j * H + (r + 1) * half] for j in range(3)], 1)
        assert torch.equal(deq(sd, p + "attn.c_attn"), qkv)
        assert torch.equal(deq(sd, p + "attn.c_proj"), whole["attn.c_proj"][r * half:(r + 1) * half])
        # 2 groups of 32, then 1; act order keeps the groups whole on each rank and splits evenly
        cut = 48 if case == "int4-act-order" else 64
        ffn = (0, cut) if r == 0 else (cut, 96)
        assert torch.equal(deq(sd, p + "mlp.w1"), whole["mlp.w1"][:, ffn[0]:ffn[1]])
        assert torch.equal(deq(sd, p + "mlp.c_proj"), whole["mlp.c_proj"][ffn[0]:ffn[1]])
        bias = sd[p + "mlp.c_proj.bias"]
        assert torch.equal(bias, state[p + "mlp.c_proj.bias"] if r == 0 else torch.zeros_like(bias))


def test_sizes_that_do_not_split_give_a_clear_error():
    with pytest.raises(TPError, match=r"tensor_parallel_size 3 does not divide num_attention_heads 4 \(config.json\)"):
        TPPlan(ModelConfig.from_dict(TINY), 3)
    with pytest.raises(TPError, match="tensor_parallel_size 4 does not divide vocab_size 1002"):
        TPPlan(ModelConfig.from_dict({**TINY, "vocab_size": 1002}), 4)
    with pytest.raises(TPError, match="would cut a group"):  # 4 heads of 16 over 4 ranks: 16 inputs, groups of 32
        TPPlan(ModelConfig.from_dict({**_gptq_cfg().to_dict(), "intermediate_size": 256}), 4)
    with pytest.raises(TPError, match="fewer than tensor_parallel_size 4"):  # 3 groups of MLP width
        TPPlan(ModelConfig.from_dict({**_gptq_cfg().to_dict(), "hidden_size": 128, "kv_channels": 32}), 4)
    with pytest.raises(TPError, match="integer >= 1"):
        TPPlan(ModelConfig.from_dict(TINY), 0)
    if not torch.cuda.is_available():
        with pytest.raises(TPError, match="needs 2 GPUs on this host, 0 visible"):
            check_gpus(2)


def test_a_bad_size_fails_before_any_tensor_is_read(tiny_ckpt, tmp_path):
    with pytest.raises(TPError, match="does not divide num_attention_heads 4"):
        load_tp_model(tiny_ckpt, rank=0, world=3, progress=False)
    folder = tmp_path / "other"  # a config.json that does not describe the tensors: named, before slicing
    shutil.copytree(tiny_ckpt, folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.mlp\.\w+\.weight' has shape \((128, 64|64, 128)\), "
                                              r"config\.json implies \(64, 64\)"):
        load_tp_model(folder, rank=1, world=2, progress=False)


def test_real_sizes_split_as_published_checkpoints_allow():
    """Int4 group 128: the 1.8B MLP (43 groups) and 14B's (107) split unevenly on group boundaries; every size's
    heads over 2..8 ranks where they divide; 14B's 40 heads not over 16; the vocabularies over 8."""
    qc = {**GPTQ, "group_size": 128}
    plans = {s: TPPlan(ModelConfig.from_dict({**size_config(s), "quantization_config": qc}), 2) for s in
             ("1_8b", "14b", "72b")}
    assert plans["1_8b"].ffn == (22 * 128, 21 * 128) and plans["14b"].ffn == (54 * 128, 53 * 128)
    assert plans["72b"].ffn == (12288, 12288) and plans["72b"].heads == 32
    assert TPPlan(ModelConfig.from_dict({**size_config("72b"), "quantization_config": qc}), 8).vocab == (19008,) * 8
    with pytest.raises(TPError, match="num_attention_heads 40"):
        TPPlan(ModelConfig.from_dict(size_config("14b")), 16)


# ---- two gloo processes against one ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy(model, prompt, steps):
    """Prefill then `steps` greedy decode steps with DenseKVCache; NTK alpha from the prompt, frozen (spec §5.4)."""
    cfg = model.config
    alpha = ntk_alpha(len(prompt), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
    inv = model.inv_freq([alpha], "cpu")
    cache = DenseKVCache(cfg.num_hidden_layers)
    cache.begin(torch.ones(1, len(prompt), dtype=torch.bool))
    ids, logits = list(prompt), []
    with torch.no_grad():
        hidden = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, inv)
        out = model.logits(hidden)[0]  # [T, V]
        logits.append(out)
        for _ in range(steps):
            ids.append(int(out[-1].argmax()))
            cache.begin(torch.ones(1, 1, dtype=torch.bool))
            out = model.logits(model(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids) - 1]]), cache, inv))[0]
            logits.append(out)
    return torch.cat(logits), ids[len(prompt):]


def _worker(rank, world, port, runs, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for key, (folder, prompt) in runs.items():
            model = load_tp_model(folder, device="cpu", dtype=torch.float32, progress=False)
            assert model.lm_head.weight.shape[0] == model.config.vocab_size // world  # only the rank's slice
            results[key] = greedy(model, prompt, 6)
            if key.endswith("short"):  # the engine fuses w1 + w2 into gate_up: the c_proj all-reduce stays
                assert fuse_gate_up(model) == model.config.num_hidden_layers
                results[key + "-gate_up"] = greedy(model, prompt, 6)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    short = [151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]
    past = torch.randint(0, 151851, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    bf16 = dict(dtype=torch.bfloat16, bf16=True)
    int4 = dict(dtype=torch.float16, **GPTQ_SHAPE)
    return {  # seq_length 16: 40 tokens run with NTK alpha 7 and LogN
        "bf16-short": (make_tiny_checkpoint(root / "bf16", seed=7, **bf16), short),
        "bf16-past": (make_tiny_checkpoint(root / "bf16-16", seed=7, seq_length=16, **bf16), past),
        "int4-short": (make_tiny_checkpoint(root / "int4", seed=8, layout="sharded", **int4), short),
        "int4-past": (make_tiny_checkpoint(root / "int4-16", seed=8, seq_length=16, layout="bin", **int4), past),
        "72b-past": (make_tiny_checkpoint(root / "72b", seed=9, size="72b", seq_length=16, **bf16), past),
    }


def test_two_processes_give_the_logits_and_greedy_ids_of_one(runs, tmp_path):
    """fp32 compute on both sides; the all-reduces sum the partial products in another order, so the logits agree
    to float32 rounding (atol 2e-5 on logits of ~0.1), and the greedy ids exactly."""
    out = tmp_path / "tp.pt"
    for key, (folder, _) in runs.items():  # the past-seq_length folders really run past it
        assert key.endswith("short") or json.loads((folder / "config.json").read_text())["seq_length"] == 16
    mp.spawn(_worker, args=(2, _free_port(), runs, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    for key, (folder, prompt) in runs.items():
        logits, ids = greedy(load_model(folder, dtype=torch.float32, progress=False), prompt, 6)
        for run in [key] + [key + "-gate_up"] * key.endswith("short"):
            torch.testing.assert_close(got[run][0], logits, atol=2e-5, rtol=0, msg=run)
            assert got[run][1] == ids, run
