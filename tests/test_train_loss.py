"""`lm_loss` (no [tokens, vocab] logits) equals `causal_lm_loss` on the full logits and transformers'
ForCausalLMLoss: loss and gradients for the hidden states and lm_head, with padding, ignored labels and
num_items; the chunks are recomputed in backward; Liger's kernel (the CUDA path) in the Triton interpreter."""

import importlib.util
import os
import subprocess
import sys

import peft
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from qwenlm.model.loader import load_model
from qwenlm.train import loss as loss_mod
from qwenlm.train.labels import IGNORE_TOKEN_ID
from qwenlm.train.loss import causal_lm_loss, lm_loss, training_hidden

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_and_batch(tiny_ckpt):
    model = load_model(tiny_ckpt, progress=False)
    ids = torch.randint(0, 5000, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE_TOKEN_ID  # an untrained prompt
    labels[1, 7:] = IGNORE_TOKEN_ID  # padding
    labels[2, 2:5] = IGNORE_TOKEN_ID  # an untrained turn inside the row
    batch = {"input_ids": ids, "position_ids": torch.arange(10)[None].expand(3, 10)}
    with torch.no_grad():
        hidden = training_hidden(model, batch)
    return model, hidden, labels


def grads(model, hidden, labels, num_items, fn):
    model.lm_head.weight.grad = None
    h = hidden.clone().requires_grad_(True)
    model.lm_head.weight.requires_grad_(True)
    loss = fn(h, labels, num_items)
    loss.backward()
    return loss.detach(), h.grad, model.lm_head.weight.grad.clone()


@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("chunk_rows", [None, 3])  # the default (one chunk here), and 3 rows per chunk
def test_lm_loss_equals_causal_lm_loss(model_and_batch, num_items, chunk_rows, monkeypatch):
    model, hidden, labels = model_and_batch
    V = model.config.vocab_size
    if chunk_rows:
        monkeypatch.setattr(loss_mod, "_CHUNK_LOGITS", chunk_rows * V)
    seen = []
    real = loss_mod._ce_sum
    monkeypatch.setattr(loss_mod, "_ce_sum", lambda h, w, t: seen.append(h.shape[0]) or real(h, w, t))

    ref = grads(model, hidden, labels, num_items, lambda h, y, n: causal_lm_loss(model.logits(h), y, n))
    hf = grads(model, hidden, labels, num_items,
               lambda h, y, n: ForCausalLMLoss(model.logits(h), y, V, num_items_in_batch=n))
    ours = grads(model, hidden, labels, num_items, lambda h, y, n: lm_loss(model, h, y, n))
    for want in (ref, hf):
        for a, b in zip(ours, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    trained = int((labels[:, 1:] != IGNORE_TOKEN_ID).sum())
    per_pass = [min(chunk_rows, trained - i) for i in range(0, trained, chunk_rows)] if chunk_rows else [trained]
    assert seen == per_pass * 2  # every chunk made again in backward: no logits kept between the passes


def test_lm_loss_with_nothing_trained(model_and_batch):
    model, hidden, _ = model_and_batch
    labels = torch.full(hidden.shape[:2], IGNORE_TOKEN_ID)
    h = hidden.clone().requires_grad_(True)
    assert torch.isnan(lm_loss(model, h, labels)) and torch.isnan(causal_lm_loss(model.logits(h), labels))
    loss = lm_loss(model, h, labels, num_items=8)
    loss.backward()  # a gradient-accumulation micro-batch of only prompts still backpropagates
    assert loss.item() == 0 and not h.grad.any()


def test_lm_loss_through_peft(model_and_batch):
    """lm_head trained whole (modules_to_save, the official base-model LoRA) gets the gradient; a LoRA on
    lm_head is refused."""
    model, hidden, labels = model_and_batch
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    try:
        trained = pm.base_model.model.lm_head.modules_to_save["default"].weight
        with torch.no_grad():
            trained.mul_(1.5)
        lm_loss(pm, hidden, labels).backward()
        ref = trained.detach().clone().requires_grad_(True)
        causal_lm_loss(torch.nn.functional.linear(hidden, ref), labels).backward()
        torch.testing.assert_close(trained.grad, ref.grad, rtol=1e-5, atol=1e-7)
    finally:
        pm.unload()
    pl = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    try:
        with pytest.raises(ValueError, match="LoRA adapter on lm_head"):
            lm_loss(pl, hidden, labels)
    finally:
        pl.unload()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton has no build for this platform")
def test_liger_path_in_interpreter():
    """The CUDA path (`_liger_ce_sum`, Liger's Triton kernels) run by the Triton interpreter on CPU tensors,
    at a small shape, against the chunked torch path: loss, hidden and weight gradients."""
    code = r'''
import torch
from qwenlm.train import loss as L
torch.manual_seed(0)
h = torch.randn(5, 16, requires_grad=True)
w = (torch.randn(100, 16) * 0.3).requires_grad_(True)
t = torch.randint(0, 100, (5,))
out = []
for fn in (L._liger_ce_sum, L._chunked_ce_sum):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    loss.backward()
    out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
for a, b in zip(*out):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
