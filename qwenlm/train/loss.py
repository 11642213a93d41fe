"""The training forward pass and the causal-LM loss.

Loss as transformers computes it (`ForCausalLMLoss`): labels shifted left by one, IGNORE_TOKEN_ID left
out, averaged over the trained tokens of the batch (or, given `num_items`, summed and divided by it: the
Trainer passes the trained-token count of all gradient-accumulation micro-batches, so every token weighs
the same however the tokens fall into micro-batches). Logits are upcast to fp32 first, as transformers
does; the official model code does not (spec §9).

`causal_lm_loss` is the definition, on logits a caller already has. Training uses `lm_loss`, the same
number from the hidden states without ever holding the [tokens, vocab] logits: at 8,192 tokens and
Qwen's 151,936-token vocabulary the fp32 logits and their gradient alone take ~10 GB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def lm_loss(model: QWenLMHeadModel, hidden: torch.Tensor, labels: torch.Tensor,
            num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """`causal_lm_loss(model.logits(hidden), labels, num_items)` without materialising the logits.

    hidden [B,T,H] (the model's output), labels [B,T]. Only the trained positions go through lm_head. On
    CUDA: Liger Kernel's fused linear cross-entropy (logits made, consumed and turned into gradients chunk
    by chunk inside its forward). Elsewhere a chunked torch version (`_chunked_ce_sum`). `model` may be
    wrapped by PEFT (then `lm_head` in `modules_to_save` is the trained copy).
    """
    weight = _head_weight(model)
    targets = F.pad(labels, (0, 1), value=IGNORE_TOKEN_ID)[:, 1:].reshape(-1)  # [B*T]: t predicts t+1
    keep = targets != IGNORE_TOKEN_ID
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # [N,H]
    t = targets[keep]  # [N]
    if h.shape[0] == 0:  # a zero that stays in the graph, so backward works for a batch with nothing trained
        total = (hidden.reshape(-1)[:0].sum() + weight.reshape(-1)[:0].sum()).float()
    elif h.is_cuda:
        total = _liger_ce_sum(h, weight, t)
    else:
        total = _chunked_ce_sum(h, weight, t)
    return total / (keep.sum() if num_items is None else num_items)


def _head_weight(model) -> torch.Tensor:
    head = model.lm_head
    if hasattr(head, "lora_A"):
        raise ValueError("lm_loss reads lm_head's weight directly; a LoRA adapter on lm_head is not supported "
                         "(train it whole with modules_to_save=['lm_head'] instead)")
    return head.weight  # PEFT's ModulesToSaveWrapper answers with the active trained copy


def _liger_ce_sum(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ImportError(f"training on CUDA needs liger-kernel for its fused cross-entropy ({e}); "
                          "pip install 'qwenlm[train]'") from None

    # lm_head's gradient summed over chunks in fp32 (a bf16 running sum loses the small chunks' share);
    # Liger casts it back to the weight's dtype at the end.
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_TOKEN_ID, reduction="sum",
                                          accum_dtype=torch.float32 if weight.requires_grad else None)
    return fn(weight, h.contiguous(), t)


_CHUNK_LOGITS = 1 << 24  # logits per chunk: 64 MB in fp32


def _chunked_ce_sum(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over row chunks, each checkpointed: its logits are made in forward, dropped,
    and made again in backward, so neither pass holds more than one chunk of them. Written here because
    Liger's (and cut-cross-entropy's) kernels are Triton/CUDA only, and CPU training of small models and
    the tests need the same memory behaviour."""
    rows = max(1, _CHUNK_LOGITS // weight.shape[0])
    total = None
    for i in range(0, h.shape[0], rows):
        part = checkpoint(_ce_sum, h[i:i + rows], weight, t[i:i + rows], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _ce_sum(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), t, reduction="sum")  # logits as model.logits makes them
