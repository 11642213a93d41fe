"""The training forward pass and the causal-LM loss.

Loss as transformers computes it (`ForCausalLMLoss`): labels shifted left by one, IGNORE_TOKEN_ID left
out, averaged over the trained tokens of the batch (or, given `num_items`, summed and divided by it: the
Trainer passes the trained-token count of all gradient-accumulation micro-batches, so every token weighs
the same however the tokens fall into micro-batches). Logits are upcast to fp32 first, as transformers
does; the official model code does not (spec §9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenlm.model.qwen import PackedAttention, QWenLMHeadModel
from qwenlm.train.labels import IGNORE_TOKEN_ID


def batch_attention(batch: dict[str, torch.Tensor]) -> PackedAttention:
    """The attention context of a batch from `qwenlm.train.packing`: by sample boundaries when packed."""
    if "cu_seqlens" in batch:
        return PackedAttention.from_cu_seqlens(batch["cu_seqlens"].to(batch["input_ids"].device))
    return PackedAttention(torch.zeros_like(batch["input_ids"]))  # one right-padded sample per row


def training_hidden(model: QWenLMHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states [B,T,H] of a training batch.

    The official model in training mode uses no dynamic NTK (alpha 1) and no LogN scaling (spec §9).
    """
    ids = batch["input_ids"]
    inv_freq = model.inv_freq([1.0], ids.device)  # [1,1,r/2]
    return model(ids, batch["position_ids"], batch_attention(batch), inv_freq, use_logn=False)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != IGNORE_TOKEN_ID; logits [B,T,V], labels [B,T]."""
    targets = F.pad(labels, (0, 1), value=IGNORE_TOKEN_ID)[:, 1:]  # [B,T]: position t predicts t+1
    flat_logits = logits.float().reshape(-1, logits.shape[-1])  # [B*T,V]
    if num_items is None:
        return F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_TOKEN_ID)
    total = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_TOKEN_ID, reduction="sum")
    return total / num_items


def trained_token_count(labels: torch.Tensor) -> int:
    """How many targets `causal_lm_loss` averages over (the first label of a row is never a target)."""
    return int((labels[:, 1:] != IGNORE_TOKEN_ID).sum())
