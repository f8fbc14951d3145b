"""Training on several processes with PyTorch's own engines: DDP and FSDP2.

The runner is launched once per process by ``torchrun`` (or a launcher like it), which sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``setup`` joins the process group (NCCL on CUDA,
gloo on CPU). Two ways to split the work:

* ``ddp`` (DistributedDataParallel): every process holds the whole model and trains on its own
  share of every global batch; gradients are averaged during ``backward``, so every process
  takes the same step and a method sees the same gradients on each. Process 0 writes the run
  directory and evaluates; the others wait.
* ``fsdp`` (FSDP2, ``fully_shard``): parameters, gradients and optimizer state are split along
  their first dimension across processes, for models that don't fit one device. A method then
  sees only its shard of each tensor; per-tensor statistics (SPIDER's mean and spread of
  |theta0| and |S|, the mask's normalisation) are all-reduced, so a shard gets exactly the
  mask the whole tensor would (``spider.importance``). Every process takes part in forward
  passes, so evaluation runs on all of them (same examples) and checkpoints are gathered
  tensor by tensor.

Batches: ``--batch-size`` is per process and micro-batch, so a step's global batch is
``batch_size x grad_accum x world_size``; process ``r`` takes micro-batch ``m`` at position
``m * world + r`` of the single-process order, which makes a 2-process run and a 1-process run
with twice the accumulation see the same examples in every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from spider.errors import UserError

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclasses.dataclass
class Dist:
    """This process's place in the job (a single process: rank 0 of 1, mode ``none``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        """The process that writes the run directory and prints progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def sees_whole_model(self) -> bool:
        """Whether this process takes part in whole-model work (evaluation, statistics,
        checkpoints): process 0 under DDP (every process holds the same model), every process
        under FSDP2 (each holds a shard that the others need)."""
        return self.is_main or self.mode == "fsdp"

    # -- collectives (no-ops in a single process)
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes (the loss every process reports)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t[0]) / self.world

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one (e.g. SIGTERM seen by one)."""
        return self.mean(1.0 if flag else 0.0) > 0.0

    def shutdown(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) otherwise."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets "
                        "them)") from None


def setup(parallel: str, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes; returns this process's ``Dist`` and device.

    ``parallel``: ``auto`` (DDP when launched on several processes), ``none``, ``ddp`` or
    ``fsdp``. On CUDA each process takes the GPU of its local rank.
    """
    if parallel not in PARALLEL_MODES:
        raise UserError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, not "
                        f"{parallel!r}")
    rank, world, local_rank = world_from_env()
    if parallel == "auto":
        mode = "ddp" if world > 1 else "none"
    elif parallel == "none" and world > 1:
        raise UserError(f"--parallel none, but {world} processes were launched; use ddp or "
                        "fsdp, or launch one process")
    else:
        mode = "none" if (parallel == "ddp" and world == 1) else parallel
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if (world > 1 or mode == "fsdp") and not dist.is_initialized():
        if world == 1:  # FSDP on one process: a group of one (tests, and sharding code paths)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local_rank, mode=mode), device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap_model(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The module the loop trains: DDP's wrapper, the FSDP2-sharded model, or ``model``.

    FSDP2 shards every block of every ``nn.ModuleList`` (decoder and encoder layers) as its own
    unit, so only one block's full parameters exist at a time, then the rest of the model.
    """
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Unused trained parameters are legal (e.g. the last vision layer when LLaVA reads the
        # second-to-last one): their gradients stay None on every process alike.
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ----------------------------------------------------------------------------- sharded tensors
def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``t`` (a view: in-place edits reach the parameter), or ``t``."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process when sharded: call on all of them)."""
    return t.full_tensor() if is_sharded(t) else t


def as_logical(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``shard`` (laid out like ``like``'s local shard) as a tensor of ``like``'s full shape."""
    if not is_sharded(like):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def shard_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``whole`` (a full tensor read from disk), laid out like ``like``."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=like.device_mesh.device_type, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None
                             ).to_local()


def sum_across(sums: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) of a small vector of per-shard sums: the reducer sharded methods use."""
    out = sums.clone()
    dist.all_reduce(out)
    return out


def gather_full(tensors: dict[str, torch.Tensor], to_cpu: bool = True
                ) -> dict[str, torch.Tensor]:
    """Whole tensors, one at a time (collective under FSDP: every process must call it)."""
    out = {}
    for name, t in tensors.items():
        whole = full(t.detach())
        out[name] = whole.cpu() if to_cpu else whole
    return out


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)
