"""The other ranks of a tensor-parallel engine: ranks 1..N-1 run in processes of their own, rank 0 in the caller's.

Rank 0 runs the scheduler, block manager, sampler and detokenizer once; every rank holds its slice of the model
(`qwenlm.parallel`) and of the paged KV cache and runs each step's forward. Each step, rank 0 sends the step's
record and input tensors (`tp_step`), and the workers run `ModelRunner.run_prefill` / `run_decode` with them.

Startup: the workers are spawned first and load their slices while rank 0 loads its own; rank 0 waits for every
worker's "loaded" (or its error) while watching the processes, and only then do all ranks join the process group
(NCCL on GPUs with NVLink multicast off, gloo on the CPU), so a rendezvous never waits on a rank that is gone.

Failure (as vLLM's multiproc executor): a thread on rank 0 watches the worker processes. When one exits, the
others are killed, so no collective waits on them, and the step that rank 0 is in (or its next one) raises a
`TPWorkerError` naming the rank and how it ended (its traceback, when it raised). On a GPU rank 0 waits for a
step's tokens by polling its event against that watch (`wait`), since a collective whose peer is gone never
completes. A worker exits when rank 0's process does (it watches its parent) or when a collective with it fails.

Under a launcher (torchrun, possibly several hosts) nothing is spawned: `tp_launch` joins the launcher's ranks
through its store and runs the same worker loop (`_follow`) and rank-0 handle (`LaunchedRanks`, a `TPWorkers`).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from qwenlm.engine.tp_step import EngineStart, PrefillStep, RecordChannel
from qwenlm.parallel.tp import TPError

RENDEZVOUS_TIMEOUT = timedelta(seconds=60)  # every rank is loaded and alive when it starts: seconds in practice
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # the device group: ranks meet there while each compiles the same code
IDLE_TIMEOUT = timedelta(days=365)  # the step-record group: workers wait there for as long as the engine is idle
DEATH_GRACE_S = 5.0  # after a collective fails on rank 0, how long to wait for the dead rank's exit to show


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died or failed; the message names it. The engine's ranks are stopped."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _init_groups(store, rank: int, world: int, device: torch.device):
    """The default group on the device (the forward's collectives and the step inputs) and a gloo group for
    the step records; returns the channel of the latter. store None: the launcher's (MASTER_ADDR, MASTER_PORT)."""
    meet = dict(store=store) if store is not None else dict(init_method="env://")
    # NVLink multicast (NVLS) off before NCCL starts, on every rank however it was started: the GPU machines
    # forbid it.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if device.type == "cuda":
        dist.init_process_group("nccl", **meet, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device)
    else:
        dist.init_process_group("gloo", **meet, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return RecordChannel(dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))


def _broadcast_inputs(tensors) -> None:
    for t in tensors:
        dist.broadcast(t, src=0)


class TPWorkers:
    """Rank 0's handle on ranks 1..world-1 of a model folder. Spawned at once; `wait_ready` after rank 0 has
    loaded its own slice."""

    death_grace_s = DEATH_GRACE_S  # after a failed collective: how long the watch may take to name the dead rank

    def __init__(self, folder: str | Path, world: int, device: torch.device, dtype: torch.dtype | None):
        if dist.is_initialized():
            raise TPError("this process already belongs to a torch.distributed process group; a tensor-parallel "
                          "engine starts its own (rank 0 here, the other ranks in processes it spawns)")
        self.folder, self.world, self.device = Path(folder), world, torch.device(device)
        self.failure: str | None = None
        self.records: RecordChannel | None = None
        self._stopping = self._closed = False
        self._dead = threading.Event()
        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=RENDEZVOUS_TIMEOUT,
                                   wait_for_workers=False)
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA cannot be used in a forked child
        self.procs, self.conns = [], []
        atexit.register(self.shutdown)  # before the workers exist: no exit path leaves one behind
        for rank in range(1, world):
            mine, theirs = ctx.Pipe()
            dev = f"cuda:{rank}" if self.device.type == "cuda" else "cpu"
            proc = ctx.Process(target=_worker_main, name=f"qwenlm-tp-rank{rank}", daemon=True,
                               args=(rank, world, str(self.folder), dev, dtype, self.store.port, theirs, os.getpid()))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)

    # ---- startup ----------------------------------------------------------------------------------
    def wait_ready(self) -> None:
        """Wait until every worker has loaded its slice, then join the process group with them. A worker that
        raises or dies first is a TPWorkerError naming it (and the other workers are stopped)."""
        loading = dict(enumerate(self.conns, 1))
        while loading:
            ready = mp.connection.wait(list(loading.values()) + [p.sentinel for p in self.procs])
            for rank, proc in enumerate(self.procs, 1):
                conn, message = self.conns[rank - 1], None
                if rank in loading and conn in ready:
                    try:
                        message = conn.recv()
                    except EOFError:  # it died: its exit code tells how
                        message = ("died", None)
                if message == ("loaded", None):
                    del loading[rank]
                elif message is not None or proc.sentinel in ready:
                    self._startup_failed(rank, message[1] if message else None)
        threading.Thread(target=self._watch, name="qwenlm-tp-watch", daemon=True).start()
        for conn in self.conns:
            conn.send("init")
        try:  # a rank lost now leaves rank 0 waiting for it until the rendezvous times out
            self.records = _init_groups(self.store, 0, self.world, self.device)
        except Exception as e:
            self._dead.wait(self.death_grace_s)
            self.failure = self.failure or f"joining the tensor-parallel process group failed: {e}"
            self._abort()
            raise TPWorkerError(self.failure) from e

    def _startup_failed(self, rank: int, error: str | None):
        proc = self.procs[rank - 1]
        proc.join(DEATH_GRACE_S)
        how = f"raised while loading its slice of {self.folder}:\n{error}" if error else \
            f"{_describe_exit(proc.exitcode)} while loading its slice of {self.folder}"
        self.failure = f"tensor-parallel rank {rank} of {self.world} (pid {proc.pid}) {how}"
        self._abort()
        raise TPWorkerError(self.failure)

    # ---- steps ------------------------------------------------------------------------------------
    def send(self, meta, tensors=()) -> None:
        """Rank 0: the step's record to every rank (pickled, gloo: host only), then its inputs (device group)."""
        self.check()
        self.records.send(meta)
        _broadcast_inputs(tensors)

    def wait(self, event: torch.cuda.Event) -> None:
        """Wait for a step's event on rank 0, raising as soon as a rank is seen dead (its collectives never end)."""
        while not event.query():
            self.check()
            time.sleep(0)

    def check(self) -> None:
        if self.failure is not None:
            raise TPWorkerError(self.failure)
        if self._closed:
            raise TPWorkerError("the tensor-parallel engine was shut down (shutdown()): its other ranks have exited")

    @contextmanager
    def step(self):
        """`guard` for one step, with Ctrl-C held until the step's forward has been queued on every rank (the ranks
        stay in step, so the engine keeps working after an interrupted reply in `qwenlm chat`)."""
        if threading.current_thread() is not threading.main_thread():
            with self.guard():
                yield
            return
        hit = []
        previous = signal.signal(signal.SIGINT, lambda *_: hit.append(True))
        try:
            with self.guard():
                yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if hit:
            signal.raise_signal(signal.SIGINT)  # now, to the handler it was meant for

    @contextmanager
    def guard(self):
        """Around rank 0's work with collectives: any error there stops the workers (they would wait for rank 0
        forever, or are out of step); an error caused by a dead rank becomes a TPWorkerError naming it."""
        self.check()
        try:
            yield
        except TPWorkerError:
            self._abort()
            raise
        except Exception as e:
            self._dead.wait(self.death_grace_s)  # a failed collective: most often a rank died just now
            if self.failure is None:
                self.failure = f"the tensor-parallel engine stopped after an error on rank 0: {type(e).__name__}: {e}"
                self._abort()
                raise
            self._abort()
            raise TPWorkerError(self.failure) from e
        except BaseException:  # KeyboardInterrupt: the workers are out of step now
            self.failure = self.failure or "the tensor-parallel engine was interrupted on rank 0"
            self._abort()
            raise

    # ---- failure and shutdown ---------------------------------------------------------------------
    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, 1)}
        ready = mp.connection.wait(list(sentinels))
        if self._stopping:
            return
        rank = sentinels[ready[0]]
        proc, conn = self.procs[rank - 1], self.conns[rank - 1]
        proc.join(DEATH_GRACE_S)
        error = None
        try:
            if conn.poll():
                error = conn.recv()[1]
        except (EOFError, OSError, TypeError, IndexError):
            pass
        how = f"raised:\n{error}" if error else _describe_exit(proc.exitcode)
        self.failure = (f"tensor-parallel rank {rank} of {self.world} (pid {proc.pid}) {how}; "
                        "the engine's other ranks were stopped")
        self._dead.set()
        self._kill_workers()

    def _kill_workers(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(DEATH_GRACE_S)

    def _abort(self) -> None:
        """After a failure: kill every worker and drop rank 0's process groups without talking to the others."""
        self._stopping = self._closed = True
        self._kill_workers()
        self._leave_groups(abort=True)

    def _leave_groups(self, abort: bool) -> None:
        if not dist.is_initialized():
            return
        try:
            if abort and dist.get_backend() == "nccl":  # a destroy would wait on work queued for a dead peer
                dist.distributed_c10d._abort_process_group()
        finally:
            dist.destroy_process_group()
        self.records = None

    def shutdown(self) -> None:
        """Stop the workers (they leave the process group and exit) and leave it on rank 0; idempotent."""
        if self._closed:
            return
        self._stopping = self._closed = True
        atexit.unregister(self.shutdown)
        if self.failure is None and self.records is not None:
            try:
                self.records.send(None)
            except Exception:  # a worker is gone already: the kill below covers the rest
                pass
        for proc in self.procs:
            proc.join(DEATH_GRACE_S)
        self._kill_workers()
        self._leave_groups(abort=False)
        for conn in self.conns:
            conn.close()


# ---- the worker process ---------------------------------------------------------------------------

def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose rank 0 is gone (killed: no shutdown reached it) exits rather than linger."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _worker_main(rank: int, world: int, folder: str, device: str, dtype, port: int, conn, parent_pid: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: rank 0 decides what it means (stop a reply, or exit and
    # stop the workers), a worker never acts on it alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        from qwenlm.parallel.model import load_tp_model
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        model = load_tp_model(folder, rank, world, dev, dtype, progress=False).eval()
        conn.send(("loaded", None))
        if conn.recv() != "init":
            return
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
        _follow(model, _init_groups(store, rank, world, dev))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)


def _follow(model, records: RecordChannel) -> None:
    """Build the runner rank 0 builds, then run each step's forward with rank 0's inputs until told to stop."""
    from qwenlm.engine.fusion import fuse_gate_up
    from qwenlm.engine.runner import ModelRunner
    runner = None
    while True:
        meta = records.recv()
        if meta is None:
            break
        if isinstance(meta, EngineStart):
            runner = None  # a new engine on the same model: the old pool goes first
            if meta.config.fuse_mlp:
                fuse_gate_up(model)
            runner = ModelRunner(model, meta.config, meta.max_model_len)
            continue
        runner.sync_alphas(meta.alphas)
        inputs = meta.empty_inputs(runner.device)
        _broadcast_inputs(inputs)
        with torch.inference_mode():
            if isinstance(meta, PrefillStep):
                _, prompt_hidden = runner.run_prefill(meta, *inputs)
                for _ in runner.prompt_logits(prompt_hidden):  # the lm_head's gathers, as on rank 0
                    pass
            else:
                runner.run_decode(meta, *inputs)
    dist.destroy_process_group()
