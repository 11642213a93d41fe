"""Packing and the training loss: a packed batch trains exactly as its samples one by one."""

import json

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from engine_helpers import tiny_model
from qwenlm.model.qwen import PackedAttention
from qwenlm.tokenizer import Tokenizer
from qwenlm.train import causal_lm_loss, collate_packed, load_training_data, pack, pad_batch, training_hidden
from qwenlm.train.labels import IGNORE_TOKEN_ID
from qwenlm.train.loss import trained_token_count
from qwenlm.train.packing import pack_stats


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    conversations = [
        [("user", "Hi"), ("assistant", "Hello! How can I help?")],
        [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")],
        [("user", "Name a colour."), ("assistant", "Blue.")],
    ]
    data = [{"id": str(i), "conversations": [{"from": r, "value": v} for r, v in c]}
            for i, c in enumerate(conversations)]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(data))
    return load_training_data(path, Tokenizer.from_file(), max_len=256)[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(vocab_size=151936).train()


def test_pack_best_fit_keeps_budget_and_order():
    lengths = [5, 7, 3, 6, 2, 4, 8]
    packs = pack(lengths, budget=10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs)
    assert all(p == sorted(p) for p in packs)  # input order kept inside a pack
    # By hand, tightest open pack first: 5 -> A(5 left); 7 -> B(3); 3 -> B(0, exact); 6 -> C(4);
    # 2 -> C(2) rather than A(5); 4 -> A(1); 8 -> D.
    assert packs == [[0, 5], [1, 2], [3, 4], [6]]
    assert len(pack([10, 10], 10)) == 2
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack([3, 11], budget=10)


def test_collate_positions_restart_and_boundaries(samples):
    batch = collate_packed(samples)
    lengths = [len(s.input_ids) for s in samples]
    assert batch["cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert batch["input_ids"][0].tolist() == [t for s in samples for t in s.input_ids]
    # Each sample's first label is dropped: the shifted loss would predict it from the previous sample.
    for start, s in zip(batch["cu_seqlens"][:-1].tolist(), samples):
        assert batch["labels"][0, start] == IGNORE_TOKEN_ID
        assert batch["labels"][0, start + 1: start + len(s.labels)].tolist() == s.labels[1:]
    # Packing loses no loss target: the dropped first labels were never targets.
    assert trained_token_count(batch["labels"]) == sum(trained_token_count(torch.tensor([s.labels])) for s in samples)
    stats = pack_stats(samples, [[0, 1], [2]], budget=100)
    assert stats.packs == 2 and stats.fill == pytest.approx(sum(lengths) / 200)


def test_loss_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 50, generator=g)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = IGNORE_TOKEN_ID
    labels[1, 6:] = IGNORE_TOKEN_ID
    want = ForCausalLMLoss(logits, labels, vocab_size=50)
    assert causal_lm_loss(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    want = ForCausalLMLoss(logits, labels, vocab_size=50, num_items_in_batch=torch.tensor(25))
    assert causal_lm_loss(logits, labels, num_items=25).item() == pytest.approx(want.item(), rel=1e-6)
    assert trained_token_count(labels) == int((labels[:, 1:] != IGNORE_TOKEN_ID).sum()) == 10


def loss_and_grads(model, batches, num_items=None):
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = causal_lm_loss(model.logits(training_hidden(model, batch)), batch["labels"], num_items)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_same_loss_and_grads_as_one_by_one(model, samples):
    n_items = sum(trained_token_count(torch.tensor([s.labels])) for s in samples)
    one_by_one = loss_and_grads(model, [pad_batch([s], pad_id=151643) for s in samples], num_items=n_items)
    packed = loss_and_grads(model, [collate_packed(samples)])
    padded = loss_and_grads(model, [pad_batch(samples, pad_id=151643)])
    assert_same(packed, one_by_one)
    assert_same(padded, one_by_one)
    assert packed[0] > 1.0 and max(g.abs().max() for g in packed[1].values()) > 0


def test_packed_attention_stays_inside_each_sample(model, samples):
    batch = collate_packed(samples)
    with torch.no_grad():
        packed = training_hidden(model, batch)[0]
        starts = batch["cu_seqlens"].tolist()
        for k, s in enumerate(samples):
            alone = training_hidden(model, pad_batch([s], pad_id=151643))[0]
            torch.testing.assert_close(packed[starts[k]:starts[k + 1]], alone, rtol=1e-4, atol=1e-5)
        # Without the sample mask the later samples would see the earlier ones: the check above can fail.
        leaky = dict(batch)
        del leaky["cu_seqlens"]
        crossed = training_hidden(model, leaky)[0]
        assert not torch.allclose(crossed[starts[1]:starts[2]], packed[starts[1]:starts[2]], atol=1e-3)


def test_packed_attention_mask_is_block_diagonal_causal():
    ctx = PackedAttention.from_cu_seqlens(torch.tensor([0, 2, 5], dtype=torch.int32))
    want = torch.tensor([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(ctx.mask[0, 0], want)
    assert PackedAttention(torch.zeros(2, 4, dtype=torch.long)).mask is None  # one sample per row: causal


def test_packed_loss_and_grads_match_transformers_qwen2(samples):
    # Independent oracle: transformers' Qwen2ForCausalLM on the mapped weights, which splits a row into
    # samples where position_ids restart (its packed-sequence mask, used with no attention_mask and no
    # cache) and computes the loss itself.
    from test_model import to_qwen2

    small = tiny_model().train()  # vocab 1000: the samples' ids folded into it
    batch = collate_packed(samples)
    batch["input_ids"] = batch["input_ids"] % 1000
    batch["labels"] = torch.where(batch["labels"] == IGNORE_TOKEN_ID, IGNORE_TOKEN_ID, batch["labels"] % 1000)
    hf = to_qwen2(small).float().train()
    ours = causal_lm_loss(small.logits(training_hidden(small, batch)), batch["labels"])
    theirs = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(small.transformer.h[0].mlp.w1.weight.grad, hf.model.layers[0].mlp.up_proj.weight.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(small.lm_head.weight.grad, hf.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
