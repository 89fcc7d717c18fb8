"""Several processes (GPUs, or CPU processes) sharing one calibration or evaluation.

The launcher is an existing one, ``torchrun`` or ``accelerate launch``; it sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``, and :func:`init` joins the process group through accelerate's
``PartialState`` (NCCL for CUDA devices, gloo on CPUs). Library code asks :func:`current` for its
:class:`Shard`: without an initialized process group that is rank 0 of 1, and every function here is
a no-op, so a single process needs none of this.

Work is split by whole pipeline batches (:meth:`Shard.take`): a process runs exactly the batches a
single process would have run at those positions, with the same prompts and noise seeds, so its
activations are the single process's. Min/max statistics then merge exactly (:func:`all_reduce`),
which is why a sharded calibration writes the recipe a single process writes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from common.errors import DGQError

log = logging.getLogger(__name__)

T = TypeVar("T")


class ShardError(DGQError, RuntimeError):
    """The processes of one run disagree (different timesteps or sites), or have nothing to do."""


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """The process that searches, writes files and prints (rank 0)."""
        return self.rank == 0

    def take(self, items: Sequence[T], what: str = "batches") -> list[T]:
        """This process's items: every ``world``-th one from position ``rank``. :class:`ShardError` when
        some process would get none (every process must see every timestep for the merge)."""
        if len(items) < self.world:
            raise ShardError(
                f"{self.world} processes but only {len(items)} {what}: use at most {len(items)} processes, "
                "or more prompts / a smaller batch size"
            )
        return list(items[self.rank :: self.world])


def launched() -> bool:
    """True when a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def current() -> Shard:
    """This process's shard (rank 0 of 1 without an initialized process group)."""
    dist = _dist()
    return Shard(dist.get_rank(), dist.get_world_size()) if dist is not None else Shard()


# How long a process waits in one collective. Rank 0 alone scores an evaluation (FID, the judge) while
# the others wait at the end; the default (10 minutes for NCCL) is too short for that at SD scale.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


def init(device: Any) -> Shard:
    """Join the launcher's process group (when launched as several processes) for ``device``; returns
    this process's shard. Quiets logging below warnings on every process but rank 0.
    :class:`ShardError` when launched as several processes but no process group forms (a launcher
    that does not set ``LOCAL_RANK``): each process would otherwise do all the work and write."""
    if launched() and _dist() is None:
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu", timeout=COLLECTIVE_TIMEOUT)
        log.debug("process %d of %d (%s, %s)", state.process_index, state.num_processes, state.backend, device)
        if _dist() is None:
            raise ShardError(
                f"launched as {os.environ.get('WORLD_SIZE')} processes but no process group formed; "
                "launch with torchrun or accelerate launch (they set RANK, LOCAL_RANK and WORLD_SIZE)"
            )
    shard = current()
    if not shard.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    return shard


def finish() -> None:
    """Leave the process group (after the last collective), if one was joined."""
    dist = _dist()
    if dist is not None:
        from accelerate import PartialState

        dist.barrier()
        PartialState().destroy_process_group()
        PartialState._reset_state()  # a later init in this process joins a new group


def _collective_device():
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensors: Sequence[Any], op: str) -> list[Any]:
    """``tensors`` reduced elementwise over the processes (``op``: "min", "max" or "sum"), in one
    collective: flattened into one buffer of their common dtype, returned in their shapes and devices."""
    dist = _dist()
    if dist is None or not tensors:
        return list(tensors)
    import torch

    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise TypeError("all_reduce takes tensors of one dtype")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(_collective_device())
    dist.all_reduce(flat, op=ops[op])
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device))
        start += t.numel()
    return out


def all_gather_object(obj: T) -> list[T]:
    """``obj`` of every process, in rank order (``[obj]`` for a single process)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """``obj`` of every process in rank order on rank ``dst``; None on the others (``[obj]`` for a
    single process). Only ``dst`` holds them all (images of a whole evaluation, say)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def map_shared(items: Sequence[T], fn: Any, desc: str = "", progress: bool = False) -> list[Any]:
    """``[fn(item) for item in items]`` with the items shared out (item ``i`` on rank ``i mod N``) and
    the results gathered on every process, in item order; a progress bar on rank 0. ``fn`` must be
    deterministic: a result does not depend on which process computed it."""
    from tqdm.auto import tqdm

    shard = current()
    mine = tqdm(range(shard.rank, len(items), shard.world), desc=desc, disable=not (progress and shard.is_main))
    done = [(i, fn(items[i])) for i in mine]
    if shard.world == 1:
        return [result for _, result in done]
    gathered = dict(pair for part in all_gather_object(done) for pair in part)
    return [gathered[i] for i in range(len(items))]


def agree(value: Any, what: str) -> None:
    """:class:`ShardError` unless every process has the same ``value`` (describing ``what``)."""
    values = all_gather_object(value)
    for rank, v in enumerate(values):
        if v != values[0]:
            raise ShardError(f"process {rank} saw other {what} than process 0; run every process on the same inputs")
