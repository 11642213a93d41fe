"""The fine-tuning loop: data -> model (full, LoRA or Q-LoRA) -> optimizer steps -> checkpoints -> output folder.

Batches. Each epoch shuffles the samples with a generator seeded by (seed + epoch), packs them into micro-batches
of at most `batch_tokens` tokens (or groups `micro_batch` samples, padded), and every `grad_accum`
micro-batches make one optimizer step. Those micro-batches are dealt out to the processes, so the same
settings train the same way on one process or many: the loss of a step is the sum of the token losses of all
its micro-batches divided by their trained-token count (as transformers' Trainer with `num_items_in_batch`).
The whole plan is known from the seed, so a checkpoint's data position is its step number.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from qwenlm.files import save_safetensors, write_text
from qwenlm.loading import check_device, parse_dtype
from qwenlm.model.loader import load_model
from qwenlm.sampling import ParamError
from qwenlm.tokenizer import Tokenizer
from qwenlm.train import checkpoint as ckpt, distributed
from qwenlm.train.config import FinetuneConfig, option
from qwenlm.train.data import load_training_data
from qwenlm.train.labels import IGNORE_TOKEN_ID
from qwenlm.train.loss import lm_loss, training_hidden
from qwenlm.train.optim import build_optimizer, build_scheduler, resolve_optimizer
from qwenlm.train.packing import collate_packed, pack, pad_batch
from qwenlm.train.report import estimate_memory_gb, memory_in_use_gb, write_curve

log = logging.getLogger(__name__)

# Settings a resumed run must share with the checkpoint it continues (the others only change what is shown).
_RESUME_KEYS = ("model", "data", "method", "max_len", "labels", "on_long", "packing", "batch_tokens", "micro_batch",
                "grad_accum", "epochs", "lr", "warmup_ratio", "weight_decay", "betas", "grad_clip", "optimizer",
                "lora_r", "lora_alpha", "lora_dropout", "train_embeddings", "seed", "dtype")


class LossModule(nn.Module):
    """The network and its loss as one module, so DDP / FSDP see one forward per micro-batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids, cu_seqlens=None, num_items=None):
        batch = {"input_ids": input_ids, "position_ids": position_ids}
        if cu_seqlens is not None:
            batch["cu_seqlens"] = cu_seqlens
        # the loss straight from the hidden states: no [tokens, vocab] logits (loss.py)
        return lm_loss(self.model, training_hidden(self.model, batch), labels, num_items)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Each block keeps only its input for backward and recomputes the rest (non-reentrant checkpoint, which
    restores the RNG state, so LoRA dropout draws the same masks when recomputed)."""
    from torch.utils.checkpoint import checkpoint
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def resolve_dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return parse_dtype(cfg.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Trainer:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg.check()
        check_device(cfg.device)
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device
        self.output = Path(cfg.output)
        if not cfg.resume and ckpt.latest_checkpoint(self.output) is not None:
            # a fresh run would write over them, and a later --resume would mix the two runs
            raise ParamError("output", f"{option('output')}: {self.output} holds checkpoints of an earlier run; "
                                       f"pass {option('resume')} to continue it, or choose another folder")
        self.dtype = resolve_dtype(cfg, self.device)
        if cfg.method == "full" and self.dtype == torch.float16:
            raise ParamError("dtype", "--dtype fp16 cannot train every weight (fp16 updates underflow without "
                                      "fp32 master weights); use bf16 or fp32")
        torch.manual_seed(cfg.seed)  # the LoRA init draws from it: the same adapters on every process and rerun

        tok = Tokenizer.from_folder(cfg.model)
        self.pad_id = tok.eod_id
        self.samples, self.report = load_training_data(cfg.data, tok, cfg.max_len, cfg.assistant_only, cfg.on_long)
        if not self.samples:
            raise ParamError("data", f"{option('data')}: no sample left to train on ({self.report.summary()})")
        self.eval_samples = []
        if cfg.eval_data:
            self.eval_samples, _ = load_training_data(cfg.eval_data, tok, cfg.max_len, cfg.assistant_only, cfg.on_long)
        self.trained = [sum(1 for t in s.labels[1:] if t != IGNORE_TOKEN_ID) for s in self.samples]

        if cfg.method == "qlora":  # the GPTQ scales as the folder stores them; the rest in the compute dtype
            from qwenlm.train.qlora import prepare_qlora
            self.model = load_model(cfg.model, device=self.device, dtype=None, progress=self._show)
            prepare_qlora(self.model, self.dtype)
        else:
            self.model = load_model(cfg.model, device=self.device, dtype=self.dtype, progress=self._show)
        self.peft_model = None
        if cfg.method == "full":
            self.model.requires_grad_(True)
        else:
            from qwenlm.train.lora import apply_lora
            self.peft_model = apply_lora(self.model, cfg)
        self.model.train()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.loss_module = LossModule(self.model)
        self.sharding = distributed.resolve_sharding(cfg.sharding, cfg.method, self.dist)
        self.wrapped = distributed.wrap(self.loss_module, self.model.transformer.h, self.sharding, self.dist)

        self.plan = self._plan()
        self.optimizer_name = resolve_optimizer(cfg.optimizer, cfg.method, self.device)
        self.optimizer = build_optimizer(self.loss_module, self.optimizer_name, cfg.learning_rate, cfg.betas,
                                         cfg.weight_decay, self.device)
        self.scheduler = build_scheduler(self.optimizer, len(self.plan), cfg.warmup_ratio)
        # fp16 activations need loss scaling (adapters and their gradients stay fp32)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.step = 0
        self.history: list[dict] = []

    @property
    def _show(self) -> bool:
        return self.cfg.progress and self.dist.main

    # ------------------------------------------------------------ the plan: which samples each step trains

    def _micro_batches(self, samples, order: list[int]) -> list[list[int]]:
        if self.cfg.packing:
            packs = pack([len(samples[i].input_ids) for i in order], self.cfg.packing_budget)
            return [[order[j] for j in p] for p in packs]
        return [order[i:i + self.cfg.micro_batch] for i in range(0, len(order), self.cfg.micro_batch)]

    def _plan(self) -> list[tuple[int, list[list[int]]]]:
        """(epoch, micro-batches) of every optimizer step of the run."""
        steps = []
        for epoch in range(self.cfg.epochs):
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            mbs = self._micro_batches(self.samples, torch.randperm(len(self.samples), generator=g).tolist())
            steps += [(epoch, mbs[i:i + self.cfg.grad_accum]) for i in range(0, len(mbs), self.cfg.grad_accum)]
        return steps

    def _collate(self, samples) -> dict[str, torch.Tensor]:
        batch = collate_packed(samples) if self.cfg.packing else pad_batch(samples, self.pad_id)
        batch.pop("attention_mask", None)  # right padding: causal attention keeps real tokens from the pads
        return {k: v.to(self.device) for k, v in batch.items()}

    def _my_share(self, group: list[list[int]]) -> list[tuple[list[int], float]]:
        """This process's micro-batches of a step, each with its weight; a process short of one repeats the
        first with weight 0, so every process runs the same number of forwards and collectives."""
        count = math.ceil(len(group) / self.dist.world)
        mine = [(mb, 1.0) for mb in group[self.dist.rank::self.dist.world]]
        return mine + [(group[0], 0.0)] * (count - len(mine))

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, group: list[list[int]]) -> tuple[float, int]:
        """One optimizer step over the step's micro-batches: (step loss, tokens trained)."""
        loss, tokens = self.accumulate(group)
        self.update()
        return loss, tokens

    def accumulate(self, group: list[list[int]]) -> tuple[float, int]:
        """Forward and backward of this process's micro-batches of a step, gradients summed in .grad."""
        num_items = max(1, sum(self.trained[i] for mb in group for i in mb))
        share = self._my_share(group)
        total, tokens = 0.0, 0
        for k, (mb, weight) in enumerate(share):
            batch = self._collate([self.samples[i] for i in mb])
            with distributed.no_sync(self.wrapped, self.sharding, sync=k == len(share) - 1):
                loss = self.wrapped(**batch, num_items=num_items)
                # DDP / FSDP average gradients over processes: scale by their number to keep the token mean
                scaled = loss * (self.dist.world * weight)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() * weight
            tokens += int(sum(len(self.samples[i].input_ids) for i in mb) * weight)  # pads not counted
        total, tokens = distributed.all_sum([total, float(tokens)], self.dist)
        return total, int(tokens)

    def update(self) -> None:
        """Clip, step the optimizer and the schedule, clear the gradients."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.loss_module.parameters() if p.requires_grad],
                                           self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the eval samples' trained tokens (dropout off)."""
        if not self.eval_samples:
            return None
        self.loss_module.eval()
        mbs = self._micro_batches(self.eval_samples, list(range(len(self.eval_samples))))
        total = 0.0
        for mb, weight in self._my_share(mbs):
            batch = self._collate([self.eval_samples[i] for i in mb])
            total += self.wrapped(**batch, num_items=1).item() * weight  # the sum of token losses
        self.loss_module.train()
        items = sum(1 for s in self.eval_samples for t in s.labels[1:] if t != IGNORE_TOKEN_ID)
        return distributed.all_sum([total], self.dist)[0] / max(items, 1)

    # ------------------------------------------------------------ the run

    def train(self) -> Path:
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        if self.dist.main:
            if cfg.deepspeed:
                from qwenlm.train.deepspeed import settings_from_deepspeed
                used, ignored = settings_from_deepspeed(cfg.deepspeed)
                print(f"--deepspeed {cfg.deepspeed}: {', '.join(f'{k} {v}' for k, v in used.items())}; "
                      f"ignored: {', '.join(ignored) or 'nothing'}", flush=True)
            print(f"data: {self.report.summary()}", flush=True)
            print(self.describe(), flush=True)
        bar = tqdm(total=len(self.plan), initial=self.step, desc=f"finetune ({cfg.method})", unit="step",
                   disable=not self._show, dynamic_ncols=True)
        t0, tokens_seen = time.perf_counter(), 0
        while self.step < len(self.plan):
            epoch, group = self.plan[self.step]
            lr = self.scheduler.get_last_lr()[0]
            loss, tokens = self.train_step(group)
            self.step += 1
            tokens_seen += tokens
            row = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": tokens, "eval_loss": None}
            last_of_epoch = self.step == len(self.plan) or self.plan[self.step][0] != epoch
            if last_of_epoch and self.eval_samples:
                row["eval_loss"] = self.evaluate()
            self.history.append(row)
            rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                            mem=f"{memory_in_use_gb(self.device):.1f}GB", refresh=False)
            bar.update(1)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < len(self.plan):
                self.save_checkpoint()
        bar.close()
        self.save_output()
        distributed.barrier(self.dist)
        return self.output

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.loss_module.parameters() if p.requires_grad)
        tokens = self.cfg.packing_budget if self.cfg.packing else self.cfg.micro_batch * self.cfg.max_len
        gb = estimate_memory_gb(self.model.config, self.cfg.method, self.dtype, trainable, tokens,
                                self.optimizer_name, self.cfg.gradient_checkpointing, self.dist.world,
                                self.sharding == "fsdp")
        return (f"training: {self.cfg.method}, {trainable:,} trainable parameters, {len(self.plan)} optimizer steps "
                f"({self.cfg.epochs} epochs), lr {self.cfg.learning_rate:g}, {self.dtype}, {self.optimizer_name}, "
                f"{self.dist.world} process(es) ({self.sharding}) on {self.device}; "
                f"estimated peak memory ~{gb:.1f} GB per process")

    # ------------------------------------------------------------ outputs and checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_output(self) -> None:
        if self.sharding == "fsdp":
            from qwenlm.train.sharded import full_state
            state = full_state(self.loss_module, trainable_only=self.cfg.method != "full")
        else:
            state = None
        if self.dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
            if self.cfg.method == "full":
                from qwenlm.train.export import save_model_folder
                save_model_folder(state if state is not None else self.model.state_dict(), Path(self.cfg.model),
                                  self.output)
            else:
                from qwenlm.train.lora import save_adapter
                save_adapter(self.peft_model, self.output, self.cfg.model, state)
            write_curve(self.history, self.output)

    def save_checkpoint(self) -> Path | None:
        d = self.dist
        tmp = self.output / f".{ckpt.PREFIX}{self.step}.tmp"
        if d.main:
            tmp = ckpt.begin_checkpoint(self.output, self.step)
        distributed.barrier(d)
        try:
            if self.sharding == "fsdp":
                from qwenlm.train.sharded import save_sharded
                save_sharded(self.loss_module, self.optimizer, tmp / "sharded")
            elif d.main:
                save_safetensors({n: t.cpu().contiguous() for n, t in self._trainable_state().items()},
                                 tmp / "trainable.safetensors")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                if self.peft_model is not None:  # a checkpoint is also a usable adapter
                    from qwenlm.train.lora import save_adapter
                    save_adapter(self.peft_model, tmp, self.cfg.model)
            ckpt.save_rng(tmp / f"rng-{d.rank}.pt")
            if d.main:
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                if self.scaler:
                    torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
                state = {"step": self.step, "world": d.world, "config": self.cfg.to_dict(), "history": self.history}
                write_text(tmp / "trainer_state.json", json.dumps(state, indent=1))
                write_curve(self.history, self.output)
            distributed.barrier(d)
            final = ckpt.finish_checkpoint(self.output, self.step, tmp) if d.main else None
        except BaseException:
            if d.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier(d)
        return final

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in the output folder (a fresh start if there is none)."""
        found = ckpt.latest_checkpoint(self.output)
        if found is None:
            if self.dist.main:
                print(f"resume: no complete checkpoint in {self.output}; starting from step 0", flush=True)
            return
        state = json.loads((found / "trainer_state.json").read_text())
        saved = state["config"]
        for key in _RESUME_KEYS:
            mine = self.cfg.to_dict()[key]
            theirs = saved.get(key)
            if json.loads(json.dumps(mine)) != theirs:
                raise ParamError(key, f"{option('resume')}: {found} was trained with {option(key)} {theirs!r}, "
                                      f"this run has {mine!r}; resume with the same settings or a new --output")
        if self.sharding == "fsdp":
            from qwenlm.train.sharded import load_sharded
            load_sharded(self.loss_module, self.optimizer, found / "sharded")
        else:
            self._load_trainable(load_file(found / "trainable.safetensors", device=str(self.device)))
            # our own file: torch.load needs weights_only=False for torchao's 8-bit state tensors
            self.optimizer.load_state_dict(torch.load(found / "optimizer.pt", map_location=self.device,
                                                      weights_only=self.optimizer_name == "adamw"))
        self.scheduler.load_state_dict(torch.load(found / "scheduler.pt", weights_only=True))
        if self.scaler and (found / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(found / "scaler.pt", weights_only=True))
        rng = found / f"rng-{self.dist.rank}.pt"
        ckpt.load_rng(rng if rng.is_file() else found / "rng-0.pt")
        self.step, self.history = state["step"], state["history"]
        if self.dist.main:
            print(f"resumed from {found} (step {self.step} of {len(self.plan)})", flush=True)


def finetune(cfg: FinetuneConfig) -> Path:
    """Train as `cfg` says and write the output folder; returns it."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        distributed.teardown(trainer.dist)
