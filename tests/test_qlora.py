"""Q-LoRA: gradients through frozen GPTQ linears equal those of the same network with the dequantized weights
as plain nn.Linear (PEFT's own LoRA on both), and LoRA on a tiny GPTQ Int4 model learns."""

import copy
import importlib.util
import os
import subprocess
import sys

import peft
import pytest
import torch
import torch.utils.checkpoint
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn

from qwenlm.model import quant
from qwenlm.model.loader import load_model
from qwenlm.testing import make_tiny_checkpoint
from qwenlm.train.labels import IGNORE_TOKEN_ID
from qwenlm.train.loss import causal_lm_loss, training_hidden
from qwenlm.train.qlora import prepare_qlora, qlora_compute_dtype, register_gptq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QC = {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
      "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"}
TARGETS = ["c_attn", "c_proj", "w1", "w2"]


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qlora") / "tiny-Int4", quantization_config=QC,
                                dtype=torch.float16, fp16=True)


def random_layer(K, N, bits, group, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = quant.GPTQLinear(K, N, bits, group)
    G = K // group
    layer.qweight = quant.pack_rows(torch.randint(0, 2 ** bits, (K, N), generator=gen), bits)
    layer.qzeros = quant.pack_cols(torch.randint(0, 2 ** bits - 1, (G, N), generator=gen), bits)
    layer.scales = (torch.rand(G, N, generator=gen) * 0.01 + 0.001).half()
    layer.bias = (torch.randn(N, generator=gen) * 0.1).half()
    if act_order:
        layer.g_idx = (torch.randperm(K, generator=gen) // group).int()
    return layer


def dense_linear(layer: quant.GPTQLinear) -> nn.Linear:
    """The plain nn.Linear a GPTQ layer stands for (spec §10.4 dequantization, fp32)."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        w = quant.dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)  # [K, N]
        lin.weight.copy_(w.t())
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    return lin.requires_grad_(False)


def dense_model(model):
    """A deep copy of a GPTQ model with every GPTQLinear replaced by its dequantized nn.Linear."""
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, quant.GPTQLinear):
            parent, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(parent), attr, dense_linear(mod))
    return dense


@pytest.mark.parametrize("bits,act_order", [(4, False), (8, False), (4, True)])
def test_gptq_linear_input_grad_equals_dense(bits, act_order):
    layer = random_layer(128, 96, bits, 32, act_order)
    ref = dense_linear(layer)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 96)
    out = layer(x)
    out.backward(g)
    ref(x_ref).backward(g)
    torch.testing.assert_close(out, ref(x_ref.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert all(b.grad is None and not b.requires_grad for b in layer.buffers())  # packed weights stay frozen
    for reentrant in (False, True):  # under activation checkpointing (forward run again in backward)
        xc = x.detach().clone().requires_grad_(True)
        torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=reentrant).backward(g)
        torch.testing.assert_close(xc.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_inference_never_enters_the_autograd_function(monkeypatch):
    """No-grad and inference-mode calls (and inputs that need no gradient) take the plain matmul path."""
    layer = random_layer(64, 64, 4, 32)
    x = torch.randn(2, 64)
    want = layer(x)

    def fail(*a):
        raise AssertionError("inference went through _GPTQMatmul")

    monkeypatch.setattr(quant._GPTQMatmul, "apply", fail)
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(layer(xg), want)
    with torch.inference_mode():
        assert torch.equal(layer(x), want)
    assert torch.equal(layer(x), want)  # grad mode, but x needs no gradient


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton has no build for this platform")
def test_kernel_path_backward_in_interpreter():
    """The GPU path (Triton dequantize kernel in forward and backward, act-order permutation) in the
    interpreter: same output and input gradient as the dequantize path. A subprocess: TRITON_INTERPRET must
    be set before triton is imported."""
    code = r'''
import torch
from qwenlm.model import quant
torch.manual_seed(0)
for bits in (4, 8):
    layer = quant.GPTQLinear(128, 64, bits, 32, dtype=torch.float32)  # fp32 scales/bias: the model dtype
    layer.qweight = quant.pack_rows(torch.randint(0, 2 ** bits, (128, 64)), bits)
    layer.qzeros = quant.pack_cols(torch.randint(0, 2 ** bits - 1, (4, 64)), bits)
    layer.scales = torch.rand(4, 64) * 0.01 + 0.001
    layer.bias = torch.randn(64) * 0.1
    layer.g_idx = (torch.randperm(128) // 32).int()  # act-order
    x = torch.randn(6, 128, requires_grad=True)
    g = torch.randn(6, 64)
    out = layer(x); out.backward(g)
    want, want_grad = out.detach(), x.grad.clone()
    layer.prepare_kernel()
    assert layer.backend == "triton" and layer.perm is not None
    x.grad = None
    out = layer(x); out.backward(g)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-4, atol=1e-5)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def _batch():
    ids = torch.tensor([[101, 2002, 30003, 4, 55, 6006, 77, 8, 9009, 10, 11, 12],
                        [7, 999, 151000, 42, 7, 999, 151000, 42, 0, 0, 0, 0]])
    labels = ids.clone()
    labels[0, :3] = IGNORE_TOKEN_ID  # an untrained prompt
    labels[1, 8:] = IGNORE_TOKEN_ID  # padding
    return {"input_ids": ids, "position_ids": torch.arange(12)[None].expand(2, 12)}, labels


def test_qlora_gradients_equal_dense_lora(gptq_dir):
    model = load_model(gptq_dir, progress=False)  # dtype "auto": fp16, as the official Int4 config says
    assert qlora_compute_dtype("cpu") == torch.float32
    assert prepare_qlora(model) == torch.float32
    assert model.transformer.h[0].attn.c_attn.scales.dtype == torch.float16  # scales as stored
    assert not any(p.requires_grad for p in model.parameters())
    dense = dense_model(model)
    for m in (model, dense):
        m.transformer.wte.weight.requires_grad_(True)  # its gradient is the input gradient of the whole stack
    cfg_q = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    register_gptq(cfg_q)
    pq = peft.get_peft_model(model, cfg_q)
    pd = peft.get_peft_model(dense, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    wrapped = [m for m in pq.modules() if isinstance(m, GPTQLoraLinear)]
    assert len(wrapped) == 5 * model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(1)
    dense_params = dict(pd.named_parameters())
    with torch.no_grad():
        for name, p in pq.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))  # PEFT starts B at 0: no gradient to A
            if "lora_" in name:
                dense_params[name].copy_(p)
    batch, labels = _batch()
    losses = []
    for pm in (pq, pd):
        net = pm.base_model.model
        loss = causal_lm_loss(net.logits(training_hidden(net, batch)), labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    assert sum("lora_" in n for n in grads) == 2 * len(wrapped)  # A and B
    for name, g in grads.items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(g, dense_params[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_qlora_training_lowers_loss(gptq_dir):
    model = load_model(gptq_dir, progress=False)
    prepare_qlora(model)
    # A random 64-wide head can raise a logit by ~1 at most (rows of norm 0.16), so no adapter could bring the
    # loss far below ln(151936) = 11.9; a trained head has larger rows. Scaled 20x, memorising is possible.
    model.lm_head.weight.data.mul_(20)
    torch.manual_seed(0)  # PEFT's lora_A init
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    register_gptq(cfg)
    pm = peft.get_peft_model(model, cfg)
    net = pm.base_model.model
    ids = torch.tensor([[101, 2002, 30003] * 4, [7, 999, 151000, 42] * 3])
    batch = {"input_ids": ids, "position_ids": torch.arange(12)[None].expand(2, 12)}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = causal_lm_loss(net.logits(training_hidden(net, batch)), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 15 and min(losses[-5:]) < 1.0, losses  # from ~ln(V) + logit spread to memorised


def test_prepare_qlora_bf16_and_errors(gptq_dir, tiny_ckpt):
    model = load_model(gptq_dir, progress=False)
    assert prepare_qlora(model, torch.bfloat16) == torch.bfloat16
    layer = model.transformer.h[0].attn.c_attn
    assert model.lm_head.weight.dtype == layer.bias.dtype == torch.bfloat16 and layer.scales.dtype == torch.float16
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="needs a GPTQ model"):
        prepare_qlora(load_model(tiny_ckpt, progress=False))
