"""Every Qwen size's distinctive config (spec §1.1) through the network, against transformers' Qwen2ForCausalLM
(the same function up to seq_length, and past it where NTK and LogN are off: 72B) and against the spec's
transcription of dynamic NTK + LogN past seq_length (test_model.official_forward)."""

import json

import pytest
import torch

from qwenlm.config import ModelConfig
from qwenlm.generation import generate_ids
from qwenlm.model.loader import load_model
from qwenlm.model.qwen import DenseKVCache, ntk_alpha
from qwenlm.sampling import SamplingParams
from qwenlm.testing import SIZES, make_tiny_checkpoint, size_config
from test_model import official_forward, to_qwen2

SIZE_NAMES = tuple(SIZES)


def test_real_size_configs_are_the_spec_table():
    """spec §1.1, row by row (what the tiny models below shrink)."""
    rows = {"1_8b": (2048, 24, 16, 11008, 151936, 8192, 10000, True),
            "7b": (4096, 32, 32, 22016, 151936, 8192, 10000, True),
            "14b": (5120, 40, 40, 27392, 152064, 2048, 10000, True),
            "72b": (8192, 80, 64, 49152, 152064, 32768, 1000000, False)}
    for size, row in rows.items():
        cfg = ModelConfig.from_dict(size_config(size))
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
                cfg.vocab_size, cfg.seq_length, cfg.rotary_emb_base, cfg.use_dynamic_ntk) == row, size
        assert cfg.use_logn_attn == cfg.use_dynamic_ntk and cfg.head_dim == 128 and cfg.ffn_dim * 2 == row[3]


@pytest.fixture(scope="module", params=SIZE_NAMES)
def sized(request, tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / f"Qwen-{request.param}", size=request.param,
                                  seed=5)
    model = load_model(folder, dtype=torch.float32, progress=False)
    return request.param, folder, model


def _prefill(model, ids, alpha=1.0):
    cache = DenseKVCache(model.config.num_hidden_layers)
    cache.begin(torch.ones(1, len(ids), dtype=torch.bool))
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, model.inv_freq([alpha], "cpu"))
    return model.logits(hidden)[0], cache


def _decode(model, cache, tok, pos, alpha=1.0):
    cache.begin(torch.ones(1, 1, dtype=torch.bool))
    with torch.no_grad():
        return model.logits(model(torch.tensor([[tok]]), torch.tensor([[pos]]), cache,
                                  model.inv_freq([alpha], "cpu")))[0, -1]


def test_folder_holds_the_official_keys_of_the_size(sized):
    size, folder, model = sized
    raw = json.loads((folder / "config.json").read_text())
    for key in ("vocab_size", "seq_length", "rotary_emb_base", "use_dynamic_ntk", "use_logn_attn",
                "max_position_embeddings"):
        assert raw[key] == SIZES[size][key], key
    assert model.transformer.wte.weight.shape[0] == model.lm_head.weight.shape[0] == SIZES[size]["vocab_size"]
    assert raw.get("rope_theta") == (1000000 if size == "72b" else None)


def test_short_prompt_and_decode_match_transformers(sized):
    size, _, model = sized
    hf = to_qwen2(model)
    assert hf.config.rope_parameters["rope_theta"] == SIZES[size]["rotary_emb_base"]
    prompt = [151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198, 151850]  # the last: top of the vocabulary
    ours, cache = _prefill(model, prompt)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
    torch.testing.assert_close(ours, out.logits[0].float(), atol=1e-4, rtol=0)
    past, tok = out.past_key_values, int(ours[-1].argmax())
    for step in range(6):
        mine = _decode(model, cache, tok, len(prompt) + step)
        with torch.no_grad():
            out = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        torch.testing.assert_close(mine, out.logits[0, -1].float(), atol=1e-4, rtol=0)
        tok = int(mine.argmax())


def test_past_seq_length(sized, tmp_path):
    """seq_length shrunk to 16 so that 40 tokens are past it. NTK/LogN sizes: the spec's formulas (alpha 7, LogN
    on the queries); 72B (both off): still exactly transformers with rope_theta 1e6, no alpha, no LogN."""
    size, _, _ = sized
    folder = make_tiny_checkpoint(tmp_path / size, size=size, seed=6, seq_length=16)
    model = load_model(folder, dtype=torch.float32, progress=False)
    cfg = model.config
    ids = torch.randint(0, 151851, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    if cfg.use_dynamic_ntk:
        alpha = ntk_alpha(len(ids), cfg.seq_length)
        assert alpha == 7
        ours, cache = _prefill(model, ids, alpha)
        sd = {k: v.float() for k, v in model.state_dict().items()}
        ref, past, _ = official_forward(sd, cfg, ids)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        tok = int(ours[-1].argmax())
        for step in range(3):
            ref, past, _ = official_forward(sd, cfg, [tok], past, alpha=alpha)
            mine = _decode(model, cache, tok, len(ids) + step, alpha)
            torch.testing.assert_close(mine, ref[-1], atol=1e-4, rtol=0)
            tok = int(mine.argmax())
        return
    assert size == "72b" and not cfg.use_logn_attn
    hf = to_qwen2(model)
    hf.config.max_position_embeddings = 64
    ours, cache = _prefill(model, ids)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
    torch.testing.assert_close(ours, out.logits[0].float(), atol=1e-4, rtol=0)
    tok = int(ours[-1].argmax())
    mine = _decode(model, cache, tok, len(ids))
    with torch.no_grad():
        ref = hf(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(mine, ref.float(), atol=1e-4, rtol=0)
    # the generation loop picks no NTK alpha and no LogN by itself for this config
    ours = generate_ids(model, [ids], SamplingParams(temperature=0.0, max_tokens=4), stop_token_ids=set())[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                          pad_token_id=151643)[0, len(ids):].tolist()
    assert ours == ref
