"""How a learning run spreads over ranks: one process, data parallel (``ddp``), or FSDP2.

Under ``torchrun`` every rank runs :func:`patchc.learn_masks` with the same arguments.  A CUDA
device means the GPU of the process's ``LOCAL_RANK``.  ``ddp``: each rank holds the whole model
and learning state, and every logit gradient is averaged with an all-reduce as soon as it is
final.  ``fsdp``: every decoder block (and then the root) is wrapped with FSDP2's
``fully_shard``, so the frozen weights, the logits, their gradients (reduce-scattered) and the
Adam moments (kept beside the local shard) are split across the ranks; the 2:4 pattern logits
[6, N, K/4] are sharded on N.  Either way all ranks draw the same Gumbel noise and hold the same
logits, so they extract the same plan.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import FSDP_AUTO_PARAMS

log = logging.getLogger("patchc")
# a rank may wait this long for the others (a SparseGPT prior of a 7B model takes many minutes)
TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None      # where this rank learns (None: where the model is)
    strategy: str = "single"                   # "single" | "ddp" | "fsdp"
    mesh: object = None

    @property
    def group(self) -> bool:
        return self.world > 1

    # ---- collectives ---------------------------------------------------------------------------
    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's, in place (through the device for NCCL)."""
        if not self.group:
            return
        import torch.distributed as dist
        for t in tensors:
            via = self._comm(t)
            dist.broadcast(via, 0)
            if via is not t:
                t.copy_(via)

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of a few numbers (log records)."""
        if not self.group:
            return values
        import torch.distributed as dist
        t = self._comm(torch.tensor(values, dtype=torch.float64))
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def average_grad_(self, p: torch.Tensor) -> None:
        """ddp: average a gradient over the ranks (fsdp reduce-scatters by itself)."""
        if self.strategy == "ddp":
            import torch.distributed as dist
            g = self._comm(p.grad)
            dist.all_reduce(g)
            g /= self.world
            if g is not p.grad:
                p.grad.copy_(g)

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist
            dist.barrier()

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            return t.to(self.device)
        return t

    # ---- sharding -------------------------------------------------------------------------------
    def shard(self, model: nn.Module, blocks: Optional[nn.ModuleList], offload: bool) -> None:
        """fsdp: ``fully_shard`` every decoder block, then the root (embeddings, norm, LM head)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
        from torch.distributed.tensor import Shard

        dev = self.device or torch.device("cpu")
        self.mesh = init_device_mesh(dev.type, (self.world,))
        world = self.world

        def place(p: nn.Parameter):
            # the [6, N, K/4] pattern logits on N (an even split; dim 0 has only 6 rows)
            if p.dim() == 3 and p.shape[0] == 6 and p.shape[1] % world == 0:
                return Shard(1)
            return None
        kw = dict(mesh=self.mesh, shard_placement_fn=place,
                  offload_policy=CPUOffloadPolicy(pin_memory=dev.type == "cuda") if offload else OffloadPolicy())
        if blocks is None:
            log.warning("patchc: the model has no list of decoder blocks; FSDP shards it as one unit")
        else:
            for block in blocks:
                fully_shard(block, **kw)
        # the input and output embeddings as units of their own (unless tied): each is gathered
        # only while it runs, instead of staying whole with the root for the entire step
        ends = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
        if all(e is not None for e in ends) and ends[0].weight is not ends[1].weight:
            for e in ends:
                fully_shard(e, **kw)
        fully_shard(model, **kw)

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """A parameter's whole tensor (all-gathered when sharded)."""
        return t.full_tensor() if hasattr(t, "full_tensor") else t


def setup(cfg, model: nn.Module) -> Dist:
    """Join the process group torchrun describes (when none is set up yet), pick this rank's
    device and the strategy (``cfg.strategy``; ``auto``: fsdp from ~1 B parameters)."""
    import torch.distributed as dist
    dev = cfg.device
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if dev is not None:
        dev = torch.device(dev)
        if dev.type == "cuda" and (world_env > 1 or (dist.is_available() and dist.is_initialized())):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if dev.index is not None and dev.index != local_rank:
                log.warning("patchc: device %s under torchrun: rank with LOCAL_RANK=%d uses cuda:%d", dev, local_rank,
                            local_rank)
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
    if not dist.is_available():
        return Dist(device=dev)
    if not dist.is_initialized() and world_env > 1:
        dist.init_process_group("nccl" if dev is not None and dev.type == "cuda" else "gloo", timeout=TIMEOUT)
        log.info("patchc: joined a %s process group of %d ranks", dist.get_backend(), dist.get_world_size())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if cfg.strategy == "fsdp":
            log.warning("patchc: strategy='fsdp' on a single rank: nothing to shard, learning unsharded")
        return Dist(device=dev)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "fsdp" if sum(p.numel() for p in model.parameters()) >= FSDP_AUTO_PARAMS else "ddp"
    return Dist(dist.get_rank(), dist.get_world_size(), dev, strategy)
