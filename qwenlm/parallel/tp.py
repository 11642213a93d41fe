"""The tensor-parallel sharding plan (Megatron-style) of a Qwen v1 checkpoint, and sharding / unsharding its tensors.

Per block: `attn.c_attn` is split by heads (Q, K and V each, bias too), `mlp.w1` and `mlp.w2` by output columns,
`attn.c_proj` and `mlp.c_proj` by input rows (their partial outputs are summed by one all-reduce each; a bias is
held by rank 0 only, the others hold zeros, so it is added once). `transformer.wte` and `lm_head` are split by
vocabulary rows. Norms are replicated.

GPTQ layers (spec §10.4: qweight [K/per, N] packed along the input, qzeros [G, N/per] packed along the output,
scales [G, N], g_idx [K]) are cut the same way: output columns in whole int32 words, input rows on group
boundaries, with g_idx rebased to the rank's first group. An act-order checkpoint (`desc_act`, g_idx any order)
keeps every group's scales and zeros on each rank and cuts only qweight and g_idx, in whole packed words.

The MLP width is split in whole units (a GPTQ group, else one column) as evenly as they go: Qwen-1.8B's 5,504 =
43 groups of 128 and Qwen-14B's 13,696 = 107, so 2 ranks get 22 and 21 (54 and 53) groups. The heads and the
vocabulary must divide evenly (a bad count is a `TPError` naming the field).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenlm.config import ModelConfig


class TPError(ValueError):
    """A tensor-parallel size this model cannot be split into; the message names the field and the values."""


def split_sizes(total: int, world: int, unit: int, what: str) -> tuple[int, ...]:
    """`total` cut into `world` runs of whole `unit`s, the first ones one unit longer where it does not divide."""
    if total % unit:
        raise TPError(f"{what} {total} is not a whole number of {unit}-wide units: a split would cut a unit")
    units = total // unit
    if units < world:
        raise TPError(f"{what} {total} has {units} units of {unit}, fewer than tensor_parallel_size {world}")
    return tuple((units // world + (r < units % world)) * unit for r in range(world))


def _even(total: int, world: int, what: str) -> tuple[int, ...]:
    if total % world:
        raise TPError(f"tensor_parallel_size {world} does not divide {what} {total} (config.json)")
    return (total // world,) * world


@dataclass(frozen=True)
class Split:
    """How one tensor is cut: along `dim` into runs of `sizes` (per rank), in `parts` equal consecutive blocks
    that are each cut so (c_attn's Q | K | V); dim None: every rank holds it whole (with `rank0`: rank 0 holds
    it, the others zeros). `group_size` (a GPTQ g_idx cut on group boundaries): its values are rebased to the
    rank's first group, start // group_size."""
    dim: int | None
    sizes: tuple[int, ...] = ()
    parts: int = 1
    rank0: bool = False
    group_size: int = 0

    def ranges(self, rank: int, length: int) -> list[tuple[int, int]]:
        """[start, stop) runs along dim (one per part) that rank `rank` holds of a tensor `length` long there."""
        part, total = length // self.parts, sum(self.sizes)  # packed tensors: sizes count unpacked values
        start, stop = sum(self.sizes[:rank]) * part // total, sum(self.sizes[:rank + 1]) * part // total
        return [(p * part + start, p * part + stop) for p in range(self.parts)]


class TPPlan:
    """Which `Split` each tensor of a config's checkpoint takes for `world` ranks; checks the config splits."""

    def __init__(self, cfg: ModelConfig, world: int):
        if not isinstance(world, int) or world < 1:
            raise TPError(f"tensor_parallel_size must be an integer >= 1, got {world!r}")
        self.cfg, self.world = cfg, world
        heads = cfg.num_attention_heads
        if heads % world:
            fits = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
            raise TPError(f"tensor_parallel_size {world} does not divide num_attention_heads {heads} "
                          f"(config.json); choose one of {fits}")
        self.heads = heads // world
        self.vocab = _even(cfg.vocab_size, world, "vocab_size")
        qc = cfg.quantization_config or {}
        self.bits = int(qc.get("bits", 4)) if qc else 0
        group = int(qc.get("group_size", 128)) if qc else 0
        self.act_order = bool(qc.get("desc_act", False))
        self.per = 32 // self.bits if qc else 1
        d = cfg.head_dim
        self.head_cols = (self.heads * d,) * world
        if not qc:
            self.ffn = split_sizes(cfg.ffn_dim, world, 1, "MLP width (intermediate_size / 2)")
            self.group = 0
            return
        # GPTQ: cut input rows on group boundaries (act order: on packed words; groups stay whole on every rank)
        if group <= 0 and world > 1 and not self.act_order:
            raise TPError(f"quantization_config group_size {group} (one group per layer): a row split of "
                          f"c_proj over {world} ranks would cut its group")
        self.group = group if group > 0 else cfg.ffn_dim
        unit = self.per if self.act_order else self.group
        what = "GPTQ MLP width (intermediate_size / 2) in groups of group_size (quantization_config)"
        self.ffn = split_sizes(cfg.ffn_dim, world, unit, what)
        if not self.act_order and (self.heads * d) % self.group:
            raise TPError(f"tensor_parallel_size {world}: {self.heads} heads x {d} = {self.heads * d} attention inputs "
                          f"per rank is not a whole number of GPTQ groups of {self.group}: a split would cut a group")
        if (self.heads * d) % self.per:
            raise TPError(f"tensor_parallel_size {world}: {self.heads * d} attention columns per rank do not fill "
                          f"whole int32 words of {self.per} {self.bits}-bit values")

    def split(self, name: str) -> Split:
        if name in ("transformer.wte.weight", "lm_head.weight"):
            return Split(0, self.vocab)
        module, _, kind = name.rpartition(".")
        if module.endswith("attn.c_attn"):
            return self._column(kind, self.head_cols, parts=3)
        if module.endswith("mlp.w1") or module.endswith("mlp.w2"):
            return self._column(kind, self.ffn)
        if module.endswith("attn.c_proj"):
            return self._row(kind, self.head_cols)
        if module.endswith("mlp.c_proj"):
            return self._row(kind, self.ffn)
        return Split(None)  # norms

    def _column(self, kind: str, sizes, parts: int = 1) -> Split:
        """Output features split: weight [N, K] rows, bias [N]; GPTQ qweight / scales [., N], qzeros [G, N/per]."""
        if kind in ("weight", "bias"):
            return Split(0, sizes, parts)
        if kind in ("qweight", "scales", "qzeros"):
            return Split(1, sizes, parts)
        return Split(None)  # g_idx: the input side is whole

    def _row(self, kind: str, sizes) -> Split:
        """Input features split: weight [N, K] columns, bias on rank 0; GPTQ qweight / g_idx rows, and the
        groups' scales / qzeros rows unless act order keeps them whole."""
        if kind == "weight":
            return Split(1, sizes)
        if kind == "bias":
            return Split(None, rank0=True)
        if kind == "qweight":
            return Split(0, sizes)
        if kind == "g_idx":
            return Split(0, sizes, group_size=0 if self.act_order else self.group)
        return Split(None) if self.act_order else Split(0, sizes)  # scales, qzeros: whole groups

    def shard(self, name: str, tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s slice of a tensor (a torch.Tensor, or a safetensors slice: read only what is kept)."""
        sp = self.split(name)
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())
        if sp.dim is None:
            whole = tensor[...] if isinstance(tensor, torch.Tensor) else tensor[:]
            return whole if rank == 0 or not sp.rank0 else torch.zeros_like(whole)
        lead = (slice(None),) * sp.dim
        pieces = [tensor[lead + (slice(a, b),)] for a, b in sp.ranges(rank, shape[sp.dim])]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=sp.dim)
        if sp.group_size:
            out = out - sp.ranges(rank, shape[0])[0][0] // sp.group_size
        return out.contiguous()

    def unshard(self, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensor back from every rank's slice (the inverse of `shard`)."""
        sp = self.split(name)
        if sp.dim is None:
            return shards[0]
        if sp.group_size:
            shards = [s + sum(sp.sizes[:r]) // sp.group_size for r, s in enumerate(shards)]
        if sp.parts == 1:
            return torch.cat(shards, dim=sp.dim)
        blocks = [s.chunk(sp.parts, dim=sp.dim) for s in shards]  # per rank: its Q, K, V
        return torch.cat([blocks[r][p] for p in range(sp.parts) for r in range(len(shards))], dim=sp.dim)


def shard_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, rank: int,
                     world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors of a whole checkpoint state dict (official names) for `world` ranks."""
    plan = TPPlan(cfg, world)
    if not 0 <= rank < world:
        raise TPError(f"rank {rank} is not in 0..{world - 1}")
    return {name: plan.shard(name, t, rank) for name, t in state.items()}


def unshard_state_dict(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole state dict back from every rank's (`shard_state_dict` of ranks 0..world-1, in order)."""
    plan = TPPlan(cfg, len(shards))
    return {name: plan.unshard(name, [s[name] for s in shards]) for name in shards[0]}
