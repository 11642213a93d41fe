"""A tensor-parallel engine whose ranks a launcher started: `torchrun` (or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), on one host or several.

Nothing is spawned: every rank is a process of the launcher. RANK 0 runs the engine (`LaunchedRanks`, rank 0's
handle, in place of the spawned `TPWorkers`), every other rank runs the worker loop of `tp_workers` on its
LOCAL_RANK's device (`follow_launched`). The ranks differ from spawned ones only in how they meet (the launcher's
store, `init_method="env://"`, before loading: each rank then loads its own slice) and how a dead rank is found.

Failure: rank 0 cannot watch the pid of a rank on another host, so every rank beats a counter in the launcher's
store once a second and reports a traceback there when it raises. Rank 0's watch thread reads the others' counters:
a rank whose counter stands still for HEARTBEAT_TIMEOUT_S (killed, its host gone) or that reported an error makes the
step that rank 0 is in, or its next one, raise the TPWorkerError naming it. The other ranks watch rank 0's counter
and exit when it stands still or the store is gone (rank 0 raised, was killed, or its launcher stopped); a worker
that was waiting for the next step sees rank 0's sockets close at once. torchrun's own teardown adds to this on each
host (a local rank that fails ends the host's other ranks), but cannot reach the other hosts.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from qwenlm.engine.tp_workers import TPWorkers, _follow, _init_groups
from qwenlm.parallel.tp import TPError

BEAT_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0  # a live rank's beat thread runs every second even while its main thread computes
_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """This process was started by a launcher (torchrun): the tensor-parallel ranks are its processes."""
    return all(k in os.environ for k in _KEYS)


def launched_rank() -> int:
    return int(os.environ["RANK"])


def check_launch(tensor_parallel_size: int) -> None:
    """Under a launcher, WORLD_SIZE is the tensor-parallel size: one rank per process, no more, no fewer."""
    if not launched():
        return
    world = int(os.environ["WORLD_SIZE"])
    if world != tensor_parallel_size:
        raise TPError(f"the launcher started WORLD_SIZE={world} processes but --tensor-parallel-size is "
                      f"{tensor_parallel_size}: they must be equal (each process is one tensor-parallel rank; e.g. "
                      f"torchrun --nnodes 2 --nproc-per-node 8 ... --tensor-parallel-size 16)")


def launched_device(device) -> torch.device:
    """This rank's device: cuda -> cuda:LOCAL_RANK (the launcher's processes on a host take its GPUs in order)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise TPError(f"device {device}: under a launcher rank r runs on cuda:LOCAL_RANK; pass --device cuda and pick "
                      "the GPUs with CUDA_VISIBLE_DEVICES")
    from qwenlm.parallel.model import check_gpus
    check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def _join(world: int, device: torch.device):
    """Join the launcher's process group (this rank's RANK) and name this process in its store."""
    check_launch(world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    records = _init_groups(None, launched_rank(), world, device)
    store = dist.distributed_c10d._get_default_store()
    store.set(f"qwenlm/who/{launched_rank()}", f"host {socket.gethostname()}, pid {os.getpid()}")
    return store, records


class _Beat:
    """Beats this rank's counter every BEAT_S; `stale(rank)` says how long another rank's counter has stood still."""

    def __init__(self, store, rank: int, watched, on_stale):
        self.store, self.rank, self.on_stale = store, rank, on_stale
        self.seen = {r: (-1, time.monotonic()) for r in watched}
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="qwenlm-tp-beat", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(BEAT_S):
            try:
                self.store.add(f"qwenlm/beat/{self.rank}", 1)
                for r, (count, since) in self.seen.items():
                    now, new = time.monotonic(), self.store.add(f"qwenlm/beat/{r}", 0)
                    error = self.store.get(f"qwenlm/error/{r}").decode() \
                        if self.store.check([f"qwenlm/error/{r}"]) else None
                    if error or (new == count and now - since > HEARTBEAT_TIMEOUT_S):
                        return self.on_stale(r, error)
                    if new != count:
                        self.seen[r] = (new, now)
            except Exception as e:  # the store is gone: the launcher (or rank 0, its host) is gone
                return self.on_stale(None, f"the launcher's store stopped answering: {e}")


class LaunchedRanks(TPWorkers):
    """Rank 0's handle on ranks 1..world-1 started by the launcher: the spawned handle's steps, guard and shutdown,
    with the heartbeat in place of the process watch and nothing to kill (each rank ends itself)."""

    death_grace_s = HEARTBEAT_TIMEOUT_S + 2 * BEAT_S  # a dead rank is named once its beat has stood still that long

    def __init__(self, folder: str | Path, world: int, device: torch.device):
        self.folder, self.world, self.device = Path(folder), world, device
        self.failure: str | None = None
        self._stopping = self._closed = False
        self._dead = threading.Event()
        self.procs, self.conns = [], []
        atexit.register(self.shutdown)
        self.store, self.records = _join(world, device)
        self.beat = _Beat(self.store, 0, range(1, self.world), self._rank_lost)  # from now: loading is watched too

    def wait_ready(self) -> None:
        """Wait (watching the heartbeats) until every rank has loaded its slice."""
        keys = [f"qwenlm/loaded/{r}" for r in range(1, self.world)]
        while not self.store.check(keys):
            self.check()
            time.sleep(0.1)
        self.check()

    def _rank_lost(self, rank: int | None, error: str | None) -> None:
        if self._stopping:
            return
        if rank is None:
            self.failure = f"tensor-parallel rank 0 of {self.world} lost its other ranks: {error}"
        else:
            try:
                who = self.store.get(f"qwenlm/who/{rank}").decode()
            except Exception:
                who = "not yet joined"
            how = f"raised:\n{error}" if error else f"stopped answering (no heartbeat for {HEARTBEAT_TIMEOUT_S:.0f} s)"
            self.failure = f"tensor-parallel rank {rank} of {self.world} ({who}) {how}; the engine stopped"
        self._dead.set()

    def _kill_workers(self) -> None:
        self.beat.stop.set()  # the other ranks see rank 0's beat stop (or its sockets close) and exit


def follow_launched(folder: str | Path, world: int, device: torch.device, dtype: torch.dtype | None) -> None:
    """A rank > 0 on its device (`launched_device`): join, load this rank's slice, follow rank 0's steps until it
    stops, then exit the process (the caller's code after loading is rank 0's alone). A rank that raises reports its
    traceback to rank 0 and exits 1."""
    from qwenlm.parallel.model import load_tp_model
    rank = launched_rank()
    store, records = _join(world, device)

    def rank0_lost(_rank, why):
        print(f"qwenlm: tensor-parallel rank {rank}: rank 0 is gone ({why or 'no heartbeat'}); exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    beat = _Beat(store, rank, [0], rank0_lost)
    try:
        model = load_tp_model(folder, rank, world, device, dtype, progress=False).eval()
        store.set(f"qwenlm/loaded/{rank}", "1")
        _follow(model, records)
    except BaseException:
        text = traceback.format_exc()
        try:
            store.set(f"qwenlm/error/{rank}", text)
        finally:
            print(f"{text}qwenlm: tensor-parallel rank {rank} of {world} stopped (after a failed collective, most often "
                  "rank 0 or another rank is gone: see its log)", file=sys.stderr, flush=True)
            os._exit(1)
    beat.stop.set()
    sys.exit(0)
