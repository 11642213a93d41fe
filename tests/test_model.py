"""The network against independent oracles: transformers' Qwen2ForCausalLM (same function up to seq_length)
and a direct transcription of the spec's dynamic-NTK / LogN formulas (beyond seq_length)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwenlm.generation import generate_ids
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import DenseKVCache, ntk_alpha
from qwenlm.sampling import SamplingParams
from qwenlm.testing import make_tiny_checkpoint, random_state_dict
from qwenlm.config import ModelConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


def to_qwen2(model) -> Qwen2ForCausalLM:
    """Map official Qwen v1 weights onto transformers' Qwen2 (split c_attn, w2->gate, w1->up)."""
    cfg = model.config
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=cfg.layer_norm_epsilon,
        max_position_embeddings=cfg.seq_length, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_emb_base},
    )
    hf_cfg._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    sd = model.state_dict()
    H = cfg.hidden_size
    new = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            new[q + f"self_attn.{name}.weight"] = w[j * H:(j + 1) * H]
            new[q + f"self_attn.{name}.bias"] = b[j * H:(j + 1) * H]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        new[q + "mlp.gate_proj.weight"] = sd[p + "mlp.w2.weight"]
        new[q + "mlp.up_proj.weight"] = sd[p + "mlp.w1.weight"]
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        new[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    return model, to_qwen2(model)


def run_prefill(model, ids):
    cache = DenseKVCache(model.config.num_hidden_layers)
    cache.begin(torch.ones(1, len(ids), dtype=torch.bool))
    hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, model.inv_freq([1.0], "cpu"))
    return model.logits(hidden)[0], cache


def test_prefill_and_cached_decode_logits_match_transformers(models):
    model, hf = models
    prompt = [9707, 1879, 11, 358, 1079, 264, 1273, 315, 108386, 151644, 8948, 198]
    ours, cache = run_prefill(model, prompt)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
    torch.testing.assert_close(ours, out.logits[0].float(), atol=1e-4, rtol=0)
    past = out.past_key_values
    tok = int(ours[-1].argmax())
    inv = model.inv_freq([1.0], "cpu")
    for step in range(20):
        pos = len(prompt) + step
        cache.begin(torch.ones(1, 1, dtype=torch.bool))
        with torch.no_grad():
            mine = model.logits(model(torch.tensor([[tok]]), torch.tensor([[pos]]), cache, inv))[0, -1]
            out = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        torch.testing.assert_close(mine, out.logits[0, -1].float(), atol=1e-4, rtol=0)
        tok = int(mine.argmax())


def test_greedy_generation_equals_transformers_generate(models):
    model, hf = models
    prompt = [151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]
    ours = generate_ids(model, [prompt], GREEDY, stop_token_ids=set())[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=151643)[0, len(prompt):].tolist()
    assert ours == ref


def test_left_padded_batch_equals_single_runs(models):
    model, _ = models
    prompts = [[9707, 1879], [2610, 525, 264, 10950, 17847, 13, 151645], [16, 17, 18, 19, 20]]
    batch = generate_ids(model, prompts, GREEDY, stop_token_ids=set())
    singles = [generate_ids(model, [p], GREEDY, stop_token_ids=set())[0] for p in prompts]
    assert batch == singles


def test_sharded_and_bin_folders_load_to_identical_weights_and_logits(tmp_path):
    prompt = [1, 2, 3, 4, 5]
    states, logits = [], []
    for layout in ("safetensors", "sharded", "bin", "sharded-bin"):
        folder = make_tiny_checkpoint(tmp_path / layout, layout=layout, seed=3)
        model = load_model(folder, progress=False)
        states.append(model.state_dict())
        logits.append(run_prefill(model, prompt)[0])
    for state, other in zip(states[1:], logits[1:]):
        assert state.keys() == states[0].keys() and all(torch.equal(state[k], states[0][k]) for k in state)
        # the weights may sit at other memory alignments (mmap-ed files), which the BLAS may sum in another
        # order: the same logits to a few ulps
        torch.testing.assert_close(other, logits[0], atol=1e-5, rtol=0)


# ---- dynamic NTK + LogN: a direct transcription of spec §5-§6 (official modeling_qwen.py) ----

def official_forward(sd, cfg, ids, past=None, alpha=None):
    """Plain single-sequence forward written from the spec: rotary cache table of length max(2L,16) built
    from base*alpha**(d/(d-2)), rotate-half in fp32, logn_tensor indexed [key_len-T:key_len] when
    key_len > seq_length, alpha from the prompt at prefill and frozen for decode."""
    T = len(ids)
    past_len = 0 if past is None else past[0][0].shape[0]
    kv_len = past_len + T
    if alpha is None:
        ctx = math.log(kv_len / cfg.seq_length, 2) + 1
        alpha = max(2 ** math.ceil(ctx) - 1, 1)
    dim = cfg.head_dim
    base = cfg.rotary_emb_base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    n = max(2 * kv_len, 16)
    freqs = torch.outer(torch.arange(n).type_as(inv_freq), inv_freq)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[past_len:kv_len, None, :], emb.sin()[past_len:kv_len, None, :]
    logn = torch.tensor([math.log(i, cfg.seq_length) if i > cfg.seq_length else 1 for i in range(1, 32768)])

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon) * w

    def rope(t):
        rot = torch.cat((-t[..., dim // 2:], t[..., :dim // 2]), -1)
        return t * cos + rot * sin

    x = sd["transformer.wte.weight"][torch.tensor(ids)]
    H, h = cfg.hidden_size, cfg.num_attention_heads
    new_past = []
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        a = rms(x, sd[p + "ln_1.weight"])
        qkv = a @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(T, h, dim) for t in qkv.split(H, -1))
        q, k = rope(q), rope(k)
        if past is not None:
            k, v = torch.cat((past[i][0], k)), torch.cat((past[i][1], v))
        new_past.append((k, v))
        if kv_len > cfg.seq_length:
            q = q * logn[kv_len - T:kv_len][:, None, None]
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(dim)
        causal = torch.arange(kv_len)[None, :] <= torch.arange(past_len, kv_len)[:, None]
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("hts,shd->thd", att, v).reshape(T, H)
        x = x + o @ sd[p + "attn.c_proj.weight"].T
        m = rms(x, sd[p + "ln_2.weight"])
        x = x + (m @ sd[p + "mlp.w1.weight"].T * F.silu(m @ sd[p + "mlp.w2.weight"].T)) @ sd[p + "mlp.c_proj.weight"].T
    logits = rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T
    return logits, new_past, alpha


def test_ntk_alpha_formula():
    assert [ntk_alpha(n, 8192) for n in (1, 8192, 8193, 16384, 16385, 32768, 32769)] == [1, 1, 3, 3, 7, 7, 15]


def test_dynamic_ntk_and_logn_beyond_seq_length(tmp_path):
    cfg = ModelConfig.from_dict({"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "kv_channels": 16, "intermediate_size": 128,
                                 "seq_length": 16})
    sd = random_state_dict(cfg, seed=1)
    from qwenlm.model.loader import build_model
    model = build_model(cfg, device="cpu")
    model.load_state_dict(sd)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref_logits, past, alpha = official_forward(sd, cfg, ids)
    assert alpha == 7  # 40 tokens with seq_length 16
    ours, cache = run_prefill_ntk(model, ids)
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0)
    tok = int(ours[-1].argmax())
    for step in range(5):  # decode: alpha stays frozen at 7, LogN keeps growing with the position
        ref, past, _ = official_forward(sd, cfg, [tok], past, alpha=alpha)
        cache.begin(torch.ones(1, 1, dtype=torch.bool))
        mine = model.logits(model(torch.tensor([[tok]]), torch.tensor([[len(ids) + step]]), cache,
                                  model.inv_freq([alpha], "cpu")))[0]
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
        tok = int(mine[-1].argmax())
    # and the generation loop picks the same alpha by itself
    gen = generate_ids(model, [ids], SamplingParams(temperature=0, max_tokens=3), stop_token_ids=set())[0]
    assert gen[0] == int(ours[-1].argmax())


def run_prefill_ntk(model, ids):
    cache = DenseKVCache(model.config.num_hidden_layers)
    cache.begin(torch.ones(1, len(ids), dtype=torch.bool))
    alpha = ntk_alpha(len(ids), model.config.seq_length)
    hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, model.inv_freq([alpha], "cpu"))
    return model.logits(hidden)[0], cache
