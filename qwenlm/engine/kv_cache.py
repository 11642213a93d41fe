"""Paged KV blocks: a pool of fixed-size blocks, per-sequence block tables, and a prefix cache.

The prefix cache follows nano-vllm's block manager: the hash of full block i chains the hash of block
i-1 with the block's token ids, so a hit on block i means the whole prefix up to it matches. The chain is
salted with the sequence's NTK alpha because the cached keys were rotated with it. Freed blocks keep
their hash until reused, so a later request can revive them; eviction is implicit, oldest freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from qwenlm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(prev: int | None, alpha: float, token_ids: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints/floats is deterministic (no per-process salt for numbers);
    # collisions are ruled out by comparing the stored token ids on lookup.
    return hash((prev, alpha, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"KV cache has {num_blocks} blocks; it needs at least 1 "
                             "(raise gpu_memory_utilization or num_blocks)")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which served from it

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block

    def admit(self, seq: Sequence) -> None:
        """Attach cached full blocks of the prompt's prefix to a sequence that owns none."""
        assert not seq.block_table and seq.num_computed == 0
        seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Leave at least one token to compute: the step needs its logits. A sequence that wants prompt logprobs
        # takes no block past the positions already scored: their logits must be computed (as vLLM does).
        limit = min(len(seq) - 1, seq.max_cached_tokens) // bs
        h = hit = None
        for i in range(limit):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, seq.ntk_alpha, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            hit = h
        h = hit
        seq.num_computed = seq.num_cached_tokens = len(seq.block_table) * bs
        seq.num_hashed_blocks = len(seq.block_table)
        seq.last_hash = h if seq.block_table else None

    def count_prefix(self, seq: Sequence) -> None:
        """Count an admitted prompt in the hit rate (called once the admission sticks)."""
        if self.enable_prefix_caching and seq.num_output_tokens == 0:
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_cached_tokens

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` slots; False (and nothing taken) if the pool is short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        h = seq.last_hash
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash, block.token_ids = chain_hash(h, seq.ntk_alpha, tokens), tokens
                self.hash_to_block.setdefault(block.hash, block.block_id)
            h = block.hash
        seq.num_hashed_blocks, seq.last_hash = max(full, seq.num_hashed_blocks), h

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks (deepest first, so shared heads stay cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # unhashed blocks are reused first
                else:
                    self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed_blocks, seq.last_hash = 0, None
