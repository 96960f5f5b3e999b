"""The compile's view of torch.distributed: which rank this is and the few collectives the
compile uses (broadcast of tensors and objects, gather to rank 0), all torch.distributed's.

A job started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment) joins its
process group: gloo on the CPU, NCCL when the compile runs on CUDA. Without torchrun the
compile is one process and every collective is the identity. Work is spread by a fixed rule
(calibration batch b belongs to rank b % world), so any world size computes the same values
and sums them in the same order: the artifact does not depend on the number of ranks.
"""
from __future__ import annotations

import faulthandler
import os
import signal
from datetime import timedelta

import torch

TIMEOUT = timedelta(hours=6)   # a rank may wait that long for rank 0's fine-tuning or a slow block


class RankFailed(RuntimeError):
    """Another rank of the job stopped (killed, out of memory): finished blocks are kept."""


class Group:
    def __init__(self, rank: int = 0, world: int = 1, device: str = "cpu"):
        self.rank, self.world, self.device = rank, world, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, item: int) -> int:
        return item % self.world

    def mine(self, count: int) -> list[int]:
        return [i for i in range(count) if self.owner(i) == self.rank]

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:   # gloo / NCCL report a peer that went away as RuntimeError
            raise RankFailed(f"rank {self.rank}: another rank of the compile stopped ({_first_line(err)}); "
                             "every finished block is kept: rerun with --resume") from None

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """tensor (same shape on every rank) overwritten with rank src's."""
        if self.world > 1:
            import torch.distributed as dist

            self._call(dist.broadcast, tensor, src=src)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        self._call(dist.broadcast_object_list, box, src=src)
        return box[0]

    def gather_to_main(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        self._call(dist.gather_object, obj, out, dst=0)
        return out

    def all_gather_object(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        self._call(dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            self._call(dist.barrier)


SINGLE = Group()


def on_main(group: Group, fn, other):
    """fn() on rank 0; its error, if any, raised on every rank (so none waits for the others)."""
    result, error = (other, None)
    if group.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    failed = group.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 stopped: {failed}")
    return result


def spread(group: Group, count: int, work) -> list:
    """work(j) for each j < count on rank group.owner(j); every rank gets all the results, in j
    order. An error on any rank is raised on every rank (so none waits for the others)."""
    mine, error = {}, None
    try:
        for j in range(count):
            if group.owner(j) == group.rank:
                mine[j] = work(j)
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    shares = group.all_gather_object(mine if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, share in enumerate(shares):
        if isinstance(share, str):
            raise RuntimeError(f"rank {rank} stopped: {share}")
    done = {j: r for share in shares for j, r in share.items()}
    return [done[j] for j in range(count)]


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def join(device: str = "cpu") -> Group:
    """This process's Group: torchrun's process group when launched by it, else SINGLE."""
    if not launched_by_torchrun():
        return SINGLE
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    if cuda:   # one GPU per rank on its machine
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    faulthandler.enable()   # a rank that aborts in native code (SIGABRT, SIGSEGV) prints where it was
    return Group(dist.get_rank(), dist.get_world_size(), device)


def _stopped_by_torchrun(_signum, _frame):
    """torchrun stops every rank (SIGTERM) when one fails: say so, as an error the CLI prints."""
    raise RankFailed(f"rank {os.environ.get('RANK')}: stopped by torchrun because another rank of the compile "
                     "failed (its report follows); every finished block is kept: rerun with --resume")


def leave(finished: bool = False) -> None:
    """Leave the process group. finished: every rank got this far (a compile that succeeded),
    so all of them first wait at a barrier: no rank shuts its connections down while another
    still has a collective in flight with it. After an error a rank leaves at once (its peers
    may be gone or waiting elsewhere)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if finished:
            dist.barrier()
    except RuntimeError as err:   # a peer stopped after this rank's part was done
        raise RankFailed(f"rank {dist.get_rank()}: another rank stopped before the end of the compile "
                         f"({_first_line(err)}); every finished block is kept: rerun with --resume") from None
    finally:
        dist.destroy_process_group()
