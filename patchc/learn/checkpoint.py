"""Sharded, resumable checkpoints of a learning run (``torch.distributed.checkpoint``, no pickle).

A checkpoint holds everything the rest of a run depends on: every layer's logits (and, tile mode,
its fixed 2:4 patterns, so a resume does not recompute a SparseGPT prior), the Adam moments and
step count, the state of the generator that draws all the Gumbel noise (the model runs in eval
mode, so nothing else consumes random numbers), and the next step.  Resuming with the same
config continues bit-for-bit where the run stopped, on any number of ranks.

On disk, in ``checkpoint_dir``:

- ``learn_ckpt-<step>/shard-<r>-model-00001-of-00001.safetensors``: what rank r holds, written
  by DCP's ``HuggingFaceStorageWriter`` — safetensors files whose header records each tensor's
  offset in the whole (sharded logits and moments are split by rank; a replicated tensor is
  written once).  Reading them back (:func:`load`, :func:`read_tensors`) reshards to whatever
  sharding the reader has; nothing is unpickled (DCP's default writer would pickle its metadata).
- ``learn_ckpt.json``: the header (format, next step, the directory, the config options a
  resumed run must share, the layers and their shapes), written last and atomically: it always
  names a complete directory.  Older directories are removed after it is written.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from typing import Optional

import torch

from ..files import atomic_path
from .optim import Adam

FORMAT = "patchc.learn-checkpoint"
VERSION = 2
HEADER = "learn_ckpt.json"
PREFIX = "learn_ckpt-"
LEGACY = "learn_ckpt.safetensors"          # version 1: one file gathered on rank 0
# options a resumed run must share with the run that wrote the checkpoint
MUST_MATCH = ("mode", "target_sparsity", "tile", "prior", "prior_sparsity", "prior_strength", "prior_strength_24",
              "calib_batches",
              "prior_sequential", "steps", "lr", "lr_24", "tau", "kappa_tile", "kappa_24", "lambda1", "lambda2",
              "include", "exclude", "seed", "loss", "state_dtype", "batches_per_step",
              "density_weights", "hidden_distill", "pattern_plan")
# options added after the format: a checkpoint written before them ran with their default
ADDED_DEFAULTS = {"hidden_distill": 0.0, "pattern_plan": None}


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes a single process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _moment(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """An Adam moment as the checkpoint sees it: a DTensor with its parameter's sharding when the
    parameter is sharded (sharing ``m``'s storage, wherever ``m`` lives), else ``m``."""
    if not hasattr(p, "_spec"):
        return m
    from torch.distributed.tensor import DTensor
    return DTensor(m, p._spec, requires_grad=False)


def state_dict(states, adam: Adam, gen: torch.Generator, next_step: int) -> dict:
    """The tensors of a checkpoint, by name (the run's own tensors: loading fills them in place)."""
    sd = {}
    for st in states:
        for kind, p in (("tile_logits", st.tile_logits), ("pattern_logits", st.pattern_logits),
                        ("pattern24", st.pattern24)):
            if p is not None:
                sd[f"{st.name}.{kind}"] = p
    for i, p in enumerate(adam.params):
        key = adam.keys[i]
        sd[f"adam.{key}.exp_avg"] = _moment(adam.m[i], p)
        sd[f"adam.{key}.exp_avg_sq"] = _moment(adam.v[i], p)
    sd["adam.step"] = torch.tensor(adam.t, dtype=torch.int64)
    sd["rng.gumbel"] = gen.get_state().cpu()
    sd["next_step"] = torch.tensor(next_step, dtype=torch.int64)
    return sd


def header_of(cfg, shapes: dict[str, tuple], batches_per_step: int) -> dict:
    conf = cfg.to_dict()
    conf["batches_per_step"] = batches_per_step
    return {"format": FORMAT, "version": VERSION, "config": {k: conf[k] for k in MUST_MATCH},
            "layers": {n: list(s) for n, s in shapes.items()}}


def save(directory: str, next_step: int, states, adam: Adam, gen: torch.Generator, header: dict, dist) -> str:
    """Every rank writes its shards into ``learn_ckpt-<step>``; rank 0 then points the header at it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    name = f"{PREFIX}{next_step:07d}"
    path = os.path.join(directory, name)
    if dist.rank == 0:
        shutil.rmtree(path, ignore_errors=True)          # a half-written one from a crashed run
        os.makedirs(path)
    dist.barrier()
    with _quiet():
        dcp.save(state_dict(states, adam, gen, next_step),
                 storage_writer=HuggingFaceStorageWriter(path, save_distributed=True), no_dist=not dist.group)
    dist.barrier()
    if dist.rank == 0:
        with atomic_path(os.path.join(directory, HEADER)) as tmp, open(tmp, "w") as f:
            json.dump({**header, "next_step": int(next_step), "dir": name, "world": dist.world}, f, indent=1)
        for old in os.listdir(directory):
            if old.startswith(PREFIX) and old != name:
                shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    dist.barrier()
    return path


def read_header(directory: str, want: dict) -> Optional[dict]:
    """The header of the checkpoint in ``directory``, or None when there is none.  Raises
    ``ValueError`` naming the options or layers that differ from this run (``want``)."""
    path = os.path.join(directory, HEADER)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, LEGACY)):
            raise ValueError(f"{os.path.join(directory, LEGACY)}: a checkpoint in patchc's former single-file "
                             f"format (version 1); this version reads sharded checkpoints (version {VERSION}). "
                             "Finish that run with the patchc that wrote it, or remove the file to start over")
        return None
    with open(path) as f:
        header = json.load(f)
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: not a patchc learning checkpoint (version {VERSION})")
    have = {**ADDED_DEFAULTS, **header["config"]}
    have.setdefault("prior_strength_24", have.get("prior_strength"))     # before the option: one gap for both
    diff = [f"{k}: checkpoint {have.get(k)!r} vs now {want['config'][k]!r}"
            for k in MUST_MATCH if json.dumps(have.get(k)) != json.dumps(want["config"][k])]
    if diff:
        raise ValueError(f"{path}: cannot resume, LearnConfig differs from the checkpointed run: " + "; ".join(diff))
    if header["layers"] != want["layers"]:
        have, now = header["layers"], want["layers"]
        bad = sorted(set(have) ^ set(now)) or [n for n in now if have.get(n) != now[n]]
        raise ValueError(f"{path}: cannot resume, the checkpoint covers different layers or shapes: {bad[:5]}")
    if not os.path.isdir(os.path.join(directory, header["dir"])):
        raise ValueError(f"{path}: its shard directory {header['dir']!r} is missing")
    header["path"] = os.path.join(directory, header["dir"])
    return header


def load(header: dict, states, adam: Adam, gen: torch.Generator, dist) -> int:
    """Fill logits, moments and the generator from the checkpoint (resharded to this run's
    sharding); returns the step to continue at."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    sd = state_dict(states, adam, gen, 0)
    with torch.no_grad(), _quiet():
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(header["path"]), no_dist=not dist.group)
    adam.t = int(sd["adam.step"])
    gen.set_state(sd["rng.gumbel"])
    return int(sd["next_step"])


def read_tensors(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, every tensor of the checkpoint whole, on the CPU) — for inspecting a run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with open(os.path.join(directory, HEADER)) as f:
        header = json.load(f)
    reader = HuggingFaceStorageReader(os.path.join(directory, header["dir"]))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    with _quiet():
        dcp.load(out, storage_reader=HuggingFaceStorageReader(os.path.join(directory, header["dir"])), no_dist=True)
    return header, out


def read_patterns(header: dict, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Tile mode: the fixed 2:4 patterns of every layer, whole (each rank reads them itself)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    out = {f"{n}.pattern24": torch.empty((s[0], s[1] // 4), dtype=torch.uint8) for n, s in shapes.items()}
    with _quiet():
        dcp.load(out, storage_reader=HuggingFaceStorageReader(header["path"]), no_dist=True)
    return {n: out[f"{n}.pattern24"] for n in shapes}
