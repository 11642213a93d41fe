"""ModelRunner: owns the KV pool, turns a ScheduledBatch into tensors, runs the network and the sampler.

Prefill steps run on one flat row of concatenated chunks (one fresh prompt of up to 512 tokens alone replays a
CUDA graph of its length bucket: prefill_graphs.py). Decode steps replay a CUDA graph
captured for the smallest batch-size bucket that holds the batch (padding rows write to a scratch
block and attend to nothing). The pool is sized from free GPU memory after a warm-up forward at the
largest prefill the scheduler can issue, as nano-vllm does.

`launch` queues a step without waiting for it (its decode inputs may be tokens still on the device, sampled
by the step in flight); `resolve` waits for a launched step's tokens on the host (engine.py overlaps the two).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwenlm.engine.attention import PagedAttention, PrefillSeq, kv_bytes_per_token_head
from qwenlm.engine.compiled_decode import CompiledDecode
from qwenlm.engine.config import EngineConfig
from qwenlm.engine.prefill_graphs import PrefillGraphs, prefill_graph_sizes, reserve_bytes
from qwenlm.engine.sampler import SamplingBatch, logprob_details, prompt_logprob_rows, sample
from qwenlm.engine.scheduler import ScheduledBatch
from qwenlm.engine.sequence import Sequence
from qwenlm.engine.tp_step import DecodeStep, EngineStart, PrefillStep
from qwenlm.sampling import SamplingParams

log = logging.getLogger("qwenlm.engine")  # start-up phases: a first start compiles for minutes
MAX_NTK_ALPHAS = 32  # rows of the RoPE table; alpha 2**32 - 1 is far past any context length
# Prompt positions whose logits one lm_head call makes for prompt logprobs: 128 x 151,936 fp32 is 78 MB (and as
# much again for the log_softmax), whatever the prompt length: within the margin the pool sizing leaves.
PROMPT_LOGITS_ROWS = 128


@dataclass
class PromptSpan:
    """Prompt rows of one sequence in a prefill: `count` rows from prompt position `first`, the logprobs of
    prompt tokens first + 1 .. first + count."""
    seq: Sequence
    first: int
    count: int


@dataclass
class LaunchedStep:
    """A step queued on the device. Its sampled tokens stay there (the next step reads them as input ids) and
    are also copied, as the step's last work, into host memory that `resolve` reads once `done` has fired."""
    batch: ScheduledBatch
    sample_seqs: list[Sequence]
    rows: dict[int, int]  # seq_id -> row of `tokens`
    tokens: torch.Tensor | None  # [len(sample_seqs)] int64 on the device
    host: torch.Tensor | None  # tokens (and logprobs) as float64 [1 or 2, n] on the host (pinned on CUDA)
    done: torch.cuda.Event | None  # recorded after the copy to `host` (None on CPU: the copy was synchronous)
    top_k: int = 0  # width of the top-k rows in `host` (sampler.logprob_details), 0 when it holds none
    prompt_spans: tuple[PromptSpan, ...] = ()
    prompt_host: torch.Tensor | None = None  # float64 [sum of span counts, 1 + 2 * prompt_k] on the host


class ModelRunner:
    def __init__(self, model, config: EngineConfig, max_model_len: int):
        self.model = model
        self.config = config
        self.cfg = model.config
        # A tensor-parallel model's rank 0 holds its workers (qwenlm.engine.tp_workers): they build the same runner
        # now and then run every step's forward with this one. Their ranks run these methods from `run_prefill`
        # / `run_decode` on (every collective of the build and the steps happens on all ranks in the same order).
        self.tp = getattr(model, "tp_workers", None)
        with self._guard():
            if self.tp is not None:
                self.tp.send(EngineStart(config, max_model_len))
            self._build(model, config, max_model_len)

    def _guard(self):
        """Around work with collectives: on rank 0 of a tensor-parallel engine, a dead rank becomes an error naming
        it (and any error there stops the other ranks, which would otherwise wait for this one)."""
        return self.tp.guard() if self.tp is not None else nullcontext()

    def _build(self, model, config: EngineConfig, max_model_len: int) -> None:
        self.heads = model.transformer.h[0].attn.num_heads  # this rank's heads (the config's, unsplit)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self._alpha_index: dict[float, int] = {}
        # Fixed storage (CUDA graphs read rows of it by index); alphas are 1, 3, 7, 15, ... (spec §5.4).
        self._inv_table = torch.zeros(MAX_NTK_ALPHAS, self.cfg.rotary_dim // 2, device=self.device)
        self.alpha_row(1.0)
        self.compiled = config.use_compiled_decode(self.device.type == "cuda")
        # Compiled by regions between the attention calls (compiled_decode.py); batch 1 gets Triton GEMVs.
        # Created before the pool is sized, so the sizing warm-up (or _compile_prefill) compiles the prefill.
        self._compiled = CompiledDecode(model, None) if self.compiled else None
        log.info("sizing the KV cache%s", " (a warm-up forward, which compiles the prefill)" if self.compiled else "")
        self.num_blocks = self._size_pool()
        cfg = self.cfg
        # One extra block at the end: the scratch target of CUDA-graph padding rows.
        shape = (cfg.num_hidden_layers, self.num_blocks + 1, self.block_size, self.heads, cfg.head_dim)
        self.ctx = PagedAttention.allocate(shape, self.dtype, config.kv_cache_dtype, self.device, config.attention_backend)
        self.k_cache, self.v_cache = self.ctx.k_cache, self.ctx.v_cache  # uint8 for kv_cache_dtype="int8"
        self.scratch_slot = self.num_blocks * self.block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        prefill_sizes = self._prefill_graph_sizes()
        self.prefill_graphs = PrefillGraphs(self, prefill_sizes) if prefill_sizes else None
        if self.device.type == "cuda":  # pinned staging of the decode inputs, two sets used in turn
            rows = max(config.graph_batch_sizes() + [config.max_num_seqs])
            self._host_flat = [torch.zeros(5 * rows, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._host_tables = [torch.zeros(rows * self.max_blocks_per_seq, dtype=torch.int32).pin_memory()
                                 for _ in range(2)]
            self._stage = 0
        self._decode_forward = self._decode_forward_eager
        if self.compiled:
            self._compiled.ctx = self.ctx
            self._decode_forward = self._compiled
            self._compile_prefill()  # compiled by the sizing warm-up already where one ran: then a cache hit
        if self.device.type == "cuda" and not config.enforce_eager and self.ctx.backend == "triton":
            log.info("capturing CUDA graphs for %d batch sizes (compiling the decode step first)",
                     len(config.graph_batch_sizes()))
            self._capture_graphs()
            if self.prefill_graphs is not None:
                log.info("capturing CUDA graphs for prompts of up to %d tokens", max(self.prefill_graphs.sizes))
                with torch.inference_mode():
                    self.prefill_graphs.capture()

    # ---- NTK frequencies --------------------------------------------------------------------------
    def alpha_row(self, alpha: float) -> int:
        """Row of `alpha` in the table of RoPE inverse frequencies (one row per NTK alpha seen)."""
        idx = self._alpha_index.get(alpha)
        if idx is None:
            if len(self._alpha_index) == MAX_NTK_ALPHAS:
                raise RuntimeError(f"more than {MAX_NTK_ALPHAS} distinct NTK alphas: {sorted(self._alpha_index)}")
            idx = self._alpha_index[alpha] = len(self._alpha_index)
            self._inv_table[idx] = self.model.inv_freq([alpha], self.device)[0, 0, :]
        return idx

    # ---- KV pool sizing ---------------------------------------------------------------------------
    def block_bytes(self) -> int:
        cfg = self.cfg
        per_head = kv_bytes_per_token_head(cfg.head_dim, self.dtype, self.config.kv_cache_dtype)  # K and V
        return cfg.num_hidden_layers * self.block_size * self.heads * per_head

    def _size_pool(self) -> int:
        if self.config.num_blocks is not None:
            return self.config.num_blocks
        if self.device.type != "cuda":
            return 512
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._warmup()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        peak, current = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        graph_reserve = max(self.config.graph_batch_sizes()) * self.cfg.vocab_size * 4 + (256 << 20) + \
            reserve_bytes(self.cfg.hidden_size, self._prefill_graph_sizes())
        budget = total * self.config.gpu_memory_utilization - used - (peak - current) - graph_reserve
        num_blocks = int(budget) // self.block_bytes()
        if getattr(self.model, "tp_world", 1) > 1:  # one block manager for all ranks: the pool that fits on each
            agreed = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed)
        if num_blocks < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of "
                               f"{total / 2**30:.1f}); raise gpu_memory_utilization or lower max_num_batched_tokens")
        return num_blocks

    @torch.inference_mode()
    def _warmup(self) -> None:
        """Run the largest prefill and sampler the scheduler can issue, to measure peak activation memory."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        rows = min(self.config.max_num_seqs, n)
        logits = self.model.logits(self._prefill_scratch(n, slice(0, rows)))
        params = SamplingParams(temperature=0.7, top_p=0.8, top_k=50, repetition_penalty=1.1, logprobs=True)
        seqs = [Sequence("warmup", 0, [0], params, seed=i, ntk_alpha=1.0) for i in range(rows)]
        sample(logits, SamplingBatch(seqs, self.device))
        del logits
        torch.cuda.synchronize()

    def _prefill_scratch(self, n: int, rows) -> torch.Tensor:
        """Hidden states (after ln_f) of `rows` of an n-token prefill that stores nothing (pool-less context)."""
        ctx = PagedAttention([None] * self.cfg.num_hidden_layers, [None] * self.cfg.num_hidden_layers, "torch")
        ctx.set_prefill(None, [PrefillSeq(0, n, n, None)])
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)[None]
        inv = self._inv_table[torch.zeros(n, dtype=torch.long, device=self.device)][None]  # [1,n,r/2]
        return self._prefill_forward(ctx, ids, pos, inv, self.cfg.use_logn_attn, rows)

    @torch.inference_mode()
    def _compile_prefill(self) -> None:
        """Compile the prefill regions now (engine start) rather than on the first request: a 16-token prefill."""
        n = min(16, self.config.max_num_batched_tokens, self.max_model_len)
        if n >= 2:
            self._prefill_scratch(n, slice(n - 1, n))

    def _prefill_graph_sizes(self) -> list[int]:
        """The prompt lengths captured in CUDA graphs (prefill_graphs.py): none without compiled regions."""
        if not self.compiled or self.config.enforce_eager:
            return []
        return prefill_graph_sizes(min(self.config.max_num_batched_tokens, self.max_model_len))

    def _prefill_forward(self, ctx, ids, pos, inv, use_logn: bool, rows) -> torch.Tensor:
        """Hidden states after ln_f of `rows` (an index) of the flat batch ids, pos [1, T]; inv [1, 1 or T, r/2].
        Through the compiled regions when they are on (T >= 2)."""
        T = ids.shape[1]
        if self._compiled is not None and T >= 2:
            inv = inv.expand(1, T, -1).contiguous()  # one compiled graph: per-token rows always
            return self.model.transformer.ln_f(self._compiled.prefill(ctx, ids, pos, inv)[0, rows])
        return self.model(ids, pos, ctx, inv, use_logn=use_logn)[0, rows]

    # ---- steps ------------------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _to_device(self, values, dtype=torch.int64) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the batch's forward and sampling on the device; no host sync. Sequences whose last token is
        PENDING take it from `prev` (the step in flight) on the device."""
        sample_seqs = batch.sample_seqs
        spans, prompt_rows = (), None
        with self.tp.step() if self.tp is not None else nullcontext():
            if batch.is_prefill:
                logits, spans, prompt_rows = self._prefill(batch)
            else:
                logits = self._decode(batch.seqs, prev)
        rows = {s.seq_id: i for i, s in enumerate(sample_seqs)}
        tokens, both, top_k = None, None, 0
        if sample_seqs:
            sb = SamplingBatch(sample_seqs, self.device)
            tokens, logprobs = sample(logits, sb)
            details = logprob_details(logits, sb, tokens)
            if details is not None:
                both, top_k = torch.cat((tokens.double()[None], details)), min(sb.max_top_logprobs, logits.shape[1])
            else:
                both = tokens[None] if logprobs is None else torch.stack((tokens.double(), logprobs.double()))
        if self.device.type != "cuda":
            return LaunchedStep(batch, sample_seqs, rows, tokens, both, None, top_k, spans, prompt_rows)
        # Copied now, in stream order right after the sampler: reading `tokens` later would wait behind the
        # next step, which is queued by then.
        host, prompt_host = self._to_host(both), self._to_host(prompt_rows)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(batch, sample_seqs, rows, tokens, host, done, top_k, spans, prompt_host)

    @staticmethod
    def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def resolve(self, step: LaunchedStep) -> tuple[list[int], list[list[float]] | None, list[list[float]] | None]:
        """Wait for the step's results to reach the host: the one host sync of a step. Returns the tokens; per
        token its column of logprob details ([logprob] alone, or `sampler.logprob_details`'s column), or None;
        the prompt rows of `step.prompt_spans` in order ([logprob, k ids, k logprobs] each), or None."""
        if step.done is not None and self.tp is not None:
            self.tp.wait(step.done)  # a dead rank ends the wait with an error naming it
        elif step.done is not None:
            step.done.synchronize()
        prompt = step.prompt_host.tolist() if step.prompt_host is not None else None
        if step.host is None:
            return [], None, prompt
        both = step.host.tolist()
        columns = [list(c) for c in zip(*both[1:])] if len(both) > 1 else None
        return [int(t) for t in both[0]], columns, prompt

    def _prefill(self, batch: ScheduledBatch):
        """Logits [len(last), V] of the rows that sample, the prompt spans of the step, and their prompt rows
        (`sampler.prompt_logprob_rows`, float64 on the device) or None."""
        ids, positions, slots, alpha_rows, chunks, ctx_slots, last = [], [], [], [], [], [], []
        spans, span_rows, targets = [], [], []
        offset, redo = 0, self._recomputed_prefix(batch)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, end = seq.num_computed - redo, seq.num_computed + n
            n = end - start
            assert end <= seq.num_known, "prefill of a PENDING token"
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            alpha_rows += [self.alpha_row(seq.ntk_alpha)] * n
            all_slots = self._slots(seq, 0, end)
            all_slots[:redo] = self.scratch_slot  # the cached rows stay as they are
            slots.append(all_slots[start:])
            if start > 0:
                ctx_slots.append(all_slots)
            chunks.append((offset, n, end, start > 0))
            if seq.prompt_logprobs_left:
                first, stop = max(start, seq.prompt_logprobs_next), min(end, seq.num_prompt_tokens - 1)
                if stop > first:
                    spans.append(PromptSpan(seq, first, stop - first))
                    span_rows += range(offset + first - start, offset + stop - start)
                    targets += seq.token_ids[first + 1:stop + 1]
            offset += n
            if end == len(seq):
                last.append(offset - 1)
        one_row = alpha_rows[0] if len(set(alpha_rows)) == 1 else None
        meta = PrefillStep(len(ids), tuple(chunks), len(last), len(last) + len(span_rows), len(targets), one_row,
                           self.cfg.use_logn_attn and max(positions) + 1 > self.cfg.seq_length, tuple(self._alpha_index))
        # One host-to-device copy of every int64 input, in the layout PrefillStep describes
        packed = torch.cat([torch.tensor(ids + positions, dtype=torch.int64), *slots,
                            torch.tensor(alpha_rows + last + span_rows, dtype=torch.int64), *ctx_slots])
        packed = packed.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else packed
        if self.tp is not None:
            self.tp.send(meta, [packed])
        logits, prompt_hidden = self.run_prefill(meta, packed)
        if not spans:
            return logits, (), None
        k = max(s.seq.params.prompt_logprobs for s in spans)
        targets_t = self._to_device(targets)
        prompt_rows = torch.cat([prompt_logprob_rows(chunk, targets_t[i:i + PROMPT_LOGITS_ROWS], k)
                                 for i, chunk in self.prompt_logits(prompt_hidden)])
        return logits, tuple(spans), prompt_rows

    def _recomputed_prefix(self, batch: ScheduledBatch) -> int:
        """The cached tokens that a short prompt after a prefix-cache hit computes again, their K/V stored into the
        scratch slot, so that it runs as a fresh prompt in a prefill graph: a few hundred tokens cost the GPU less
        than the host spends launching the uncaptured path (prefill_graphs.py). 0 when the step does not qualify."""
        if self.prefill_graphs is None or not self.prefill_graphs.replay or len(batch.seqs) != 1:
            return 0
        seq, n = batch.seqs[0], batch.num_tokens[0]
        end = seq.num_computed + n
        if seq.prompt_logprobs_left or end != len(seq) or end > max(self.prefill_graphs.replay):
            return 0
        return seq.num_computed

    def run_prefill(self, meta: PrefillStep, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill forward on every rank: logits [num_sampled, V] fp32 and the hidden rows of the prompt
        logprobs (`prompt_logits`)."""
        graphed = self.prefill_graphs.run(meta, packed) if self.prefill_graphs is not None else None
        if graphed is not None:
            return graphed
        T = meta.num_tokens
        ids, pos, slot_mapping, alpha_rows = packed[:4 * T].view(4, T)
        rows = packed[4 * T:4 * T + meta.num_rows]
        at, seqs = 4 * T + meta.num_rows, []
        for q_start, q_len, ctx_len, cached in meta.seqs:
            seqs.append(PrefillSeq(q_start, q_len, ctx_len, packed[at:at + ctx_len] if cached else None))
            at += ctx_len if cached else 0
        self.ctx.set_prefill(slot_mapping, seqs)
        if meta.one_alpha_row is not None:
            inv = self._inv_table[meta.one_alpha_row][None, None, :]  # [1,1,r/2]
        else:
            inv = self._inv_table[alpha_rows][None]  # [1,T,r/2]
        hidden = self._prefill_forward(self.ctx, ids[None], pos[None], inv, meta.use_logn, rows)
        return self.model.logits(hidden[:meta.num_sampled]), hidden[meta.num_sampled:]  # [n, V] fp32 (n may be 0)

    def prompt_logits(self, prompt_hidden: torch.Tensor):
        """(offset, logits) of the prompt-logprob rows, PROMPT_LOGITS_ROWS at a time (on every rank: the lm_head's
        logits are gathered)."""
        for i in range(0, prompt_hidden.shape[0], PROMPT_LOGITS_ROWS):
            yield i, self.model.logits(prompt_hidden[i:i + PROMPT_LOGITS_ROWS])

    def _decode_inputs(self, seqs: list[Sequence], rows: int):
        """Flat int64 [5*rows] (ids, positions, slots, context lens, alpha rows) and the block tables [rows, W]."""
        bs = self.block_size
        n_pad = rows - len(seqs)
        ids = [max(s.token_ids[-1], 0) for s in seqs] + [0] * n_pad  # PENDING rows: filled by _feed_pending
        pos = [len(s) - 1 for s in seqs] + [0] * n_pad
        slots = [s.block_table[(len(s) - 1) // bs] * bs + (len(s) - 1) % bs for s in seqs] + [self.scratch_slot] * n_pad
        lens = [len(s) for s in seqs] + [0] * n_pad
        alphas = [self.alpha_row(s.ntk_alpha) for s in seqs] + [0] * n_pad
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs] + [[0] * width] * n_pad
        if self.device.type != "cuda":
            return self._to_device(ids + pos + slots + lens + alphas), self._to_device(tables, torch.int32)
        # Pinned staging buffers used in turn: no pinned allocation per step. Safe to overwrite: the step that
        # last used this set was launched before the step now in flight, so it was resolved (synced) already.
        self._stage ^= 1
        flat = self._host_flat[self._stage][:5 * rows]
        flat.numpy()[:] = ids + pos + slots + lens + alphas
        host_tables = self._host_tables[self._stage][:rows * width].view(rows, width)
        host_tables.numpy()[:] = tables
        return flat.to(self.device, non_blocking=True), host_tables.to(self.device, non_blocking=True)

    def _feed_pending(self, ids: torch.Tensor, seqs: list[Sequence], prev: LaunchedStep | None) -> None:
        """Write the in-flight step's sampled tokens into the input ids of the rows whose last token is PENDING,
        device to device (no host round trip)."""
        pairs = [(i, prev.rows[s.seq_id]) for i, s in enumerate(seqs) if s.num_pending]
        if not pairs:
            return
        dst, src = zip(*pairs)
        if dst == src and dst[-1] == len(dst) - 1:  # the usual case: the same rows in the same order
            ids[:len(dst)].copy_(prev.tokens[:len(dst)])
        else:
            ids.index_copy_(0, self._to_device(dst), prev.tokens.index_select(0, self._to_device(src)))

    def _decode(self, seqs: list[Sequence], prev: LaunchedStep | None = None) -> torch.Tensor:
        B = len(seqs)
        graph_bs = next((b for b in sorted(self.graphs) if b >= B), None)
        rows = graph_bs or B
        flat, tables = self._decode_inputs(seqs, rows)
        self._feed_pending(flat[:rows], seqs, prev)
        max_len = max(len(s) for s in seqs)
        meta = DecodeStep(B, rows, graph_bs is not None, tables.shape[1], max_len,
                          self.cfg.use_logn_attn and max_len > self.cfg.seq_length, tuple(self._alpha_index))
        if self.tp is not None:
            self.tp.send(meta, [flat, tables])
        return self.run_decode(meta, flat, tables)

    def run_decode(self, meta: DecodeStep, flat: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """The decode forward on every rank: logits [batch, V] fp32."""
        B, rows = meta.batch, meta.rows
        if meta.graph:
            st = self._static
            st["flat"][:, :rows].copy_(flat.view(5, rows))
            st["tables"][:rows, :meta.width].copy_(tables)
            self.graphs[rows].replay()  # context lens and RoPE rows are converted inside the graph
            return st["logits"][:B]
        ids, pos, slots, lens, alphas = flat.view(5, B)
        self.ctx.set_decode(slots, tables, lens.int(), meta.max_context_len)
        inv = self._inv_table[alphas][:, None, :]
        use_logn = meta.use_logn or (self.compiled and self.cfg.use_logn_attn)  # one compiled variant
        return self._decode_forward(ids[:, None], pos[:, None], inv, use_logn)

    def sync_alphas(self, alphas: tuple[float, ...]) -> None:
        """Add rank 0's new NTK alphas to this rank's RoPE table, in its row order."""
        for alpha in alphas[len(self._alpha_index):]:
            self.alpha_row(alpha)

    def _decode_forward_eager(self, ids, pos, inv, use_logn: bool) -> torch.Tensor:
        hidden = self.model(ids, pos, self.ctx, inv, use_logn=use_logn)
        return self.model.logits(hidden[:, 0])

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        sizes = self.config.graph_batch_sizes()
        max_bs, dev = max(sizes), self.device
        flat = torch.zeros(5, max_bs, dtype=torch.int64, device=dev)  # ids, positions, slots, lens, alpha rows
        flat[2] = self.scratch_slot
        st = self._static = {
            "flat": flat,
            "ids": flat[0], "pos": flat[1], "slots": flat[2], "alphas": flat[4],
            "lens": torch.zeros(max_bs, dtype=torch.int32, device=dev),
            "tables": torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "logits": torch.zeros(max_bs, self.cfg.vocab_size, dtype=torch.float32, device=dev),
        }
        # LogN is applied in every graph (the scale is exactly 1 up to seq_length), so one graph serves all.
        use_logn = self.cfg.use_logn_attn
        pool = None
        with torch.inference_mode():
            for bs in reversed(sizes):
                self.ctx.set_decode(st["slots"][:bs], st["tables"][:bs], st["lens"][:bs], 0)

                def forward(bs=bs):
                    st["lens"][:bs].copy_(st["flat"][3, :bs])
                    inv = self._inv_table[st["alphas"][:bs]][:, None, :]
                    st["logits"][:bs] = self._decode_forward(st["ids"][:bs, None], st["pos"][:bs, None], inv, use_logn)

                forward()  # compile kernels and settle the allocator before capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    forward()
                pool = graph.pool()
                self.graphs[bs] = graph
        self.graph_pool = pool
        torch.cuda.synchronize()
