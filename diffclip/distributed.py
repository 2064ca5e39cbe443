"""torchrun support for the command line: one process per GPU, items sharded as items[rank::world], results
gathered back into the original order so that K processes give exactly what one process gives.

NCCL on CUDA, gloo on CPU (the CPU tests run `torchrun --nproc-per-node 2` with gloo).
"""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) under torchrun (initialising the process group), else (0, 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_rows(local: torch.Tensor, n_total: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows sharded as items[rank::world] on each rank -> all n_total rows in the original order, on every rank.
    `local` is 2-D (rows, columns); ranks may hold one row more than others."""
    if world_size == 1:
        return local
    import torch.distributed as dist

    per_rank = -(-n_total // world_size)
    comm_device = local.device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(per_rank, local.shape[1], dtype=local.dtype, device=comm_device)
    padded[: local.shape[0]] = local.to(comm_device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = torch.empty(n_total, local.shape[1], dtype=local.dtype, device=comm_device)
    for r in range(world_size):
        n_r = len(range(r, n_total, world_size))
        out[r::world_size] = parts[r][:n_r]
    return out.to(local.device)


def gather_objects(obj, world_size: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; small ones: counts, caption blocks)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def sharded_rows(class_fn, classnames, dim, device, rank, world):
    """(classes, D) zero-shot weights, classes[rank::world] computed on each rank and all-gathered (per class the
    computation is independent, so this equals one process's result)."""
    mine = classnames[rank::world]
    local = class_fn(mine) if mine else torch.zeros(0, dim, device=device)
    return gather_rows(local.float(), len(classnames), rank, world)


class PeerFailed(Exception):
    """Another rank failed (and reports it): this one ends quietly."""


def agree(error: str | None, world_size: int, error_type=RuntimeError) -> None:
    """A point every rank reaches with its own outcome, so that one rank's failure does not leave the others
    blocked in a collective (ending with gloo's "Connection closed by peer"): the rank that failed raises
    error_type(error), the others raise PeerFailed. `error` is None on success."""
    errors = gather_objects(error, world_size)
    if error is not None:
        raise error_type(error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        raise PeerFailed(f"rank {failed[0]} failed: {errors[failed[0]]}")
