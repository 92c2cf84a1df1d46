"""Mask learning sharded with FSDP2 on 2 gloo ranks (CPU): the same plan as one rank, and a sharded
checkpoint written by 2 ranks resumes on 1 rank to the plan of the uninterrupted run."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import patchc
from patchc.learn import LearnConfig, learn_masks
from test_learn_helpers import TILE, calib_batches, single_thread, tiny_llama_model  # noqa: F401

# each config runs 4 steps of 2 batches (one per rank on 2 ranks)
CONFIGS = {
    "joint": dict(mode="joint"),
    "tile-knobs": dict(mode="tile", state_dtype="bfloat16", grad_checkpointing=True, offload_optimizer=True),
    "joint-recompute": dict(mode="joint", recompute_masks=True, grad_checkpointing=True, prior="wanda"),
    "joint-hidden-distill": dict(mode="joint", loss="distill", hidden_distill=1.0, grad_checkpointing=True),
}


def cfg(name: str, **kw) -> LearnConfig:
    return LearnConfig(tile=TILE, steps=4, lr=1e-2, target_sparsity=0.3, progress=False, batches_per_step=2,
                       **{**CONFIGS[name], **kw})


def data():
    return calib_batches(8, batch_size=2)


class Stop(Exception):
    pass


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        from torch.distributed.fsdp import FSDPModule

        shards = {}

        def local_state(step, rec):     # what this rank holds of the learning state, during the run
            if step == 0:
                ps = [p for n, p in model.named_parameters() if p.requires_grad]
                shards.update(local=sum(p.to_local().numel() for p in ps), full=sum(p.numel() for p in ps))
        for name in CONFIGS:
            model = tiny_llama_model(seed=0)
            plan = learn_masks(model, data(), cfg(name, strategy="fsdp"), callback=local_state)
            assert isinstance(model.model.layers[0], FSDPModule)
            assert shards["local"] <= 0.55 * shards["full"], shards
            plan.save(os.path.join(tmp, f"{name}-{rank}.safetensors"))

        def stop(step, rec):
            if step == 1:
                raise Stop
        try:           # interrupted after the checkpoint of step 2
            learn_masks(tiny_llama_model(seed=0), data(), cfg("joint", strategy="fsdp", checkpoint_every=2,
                                                                  checkpoint_dir=os.path.join(tmp, "ckpt")),
                        callback=stop)
        except Stop:
            pass
        assert dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as sock:          # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, str(tmp), port), nprocs=2, join=True)
    return tmp


def _same(a, b):
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n].mask, b[n].mask) and torch.equal(a[n].tile_kind, b[n].tile_kind), n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp_two_ranks_give_the_one_rank_plan(two_ranks, name):
    p0 = patchc.MaskPlan.load(two_ranks / f"{name}-0.safetensors")
    p1 = patchc.MaskPlan.load(two_ranks / f"{name}-1.safetensors")
    _same(p0, p1)
    one = learn_masks(tiny_llama_model(seed=0), data(), cfg(name))
    _same(p0, one)
    p0.validate()
    assert abs(p0.sparsity() - 0.3) <= 0.005


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    ck = two_ranks / "ckpt"
    header = json.loads((ck / "learn_ckpt.json").read_text())
    assert header["next_step"] == 2 and header["world"] == 2
    shards = sorted(p.name for p in (ck / header["dir"]).iterdir())
    assert shards == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    resumed = learn_masks(tiny_llama_model(seed=0), data(), cfg("joint", checkpoint_dir=str(ck), resume=True))
    _same(resumed, patchc.MaskPlan.load(two_ranks / "joint-0.safetensors"))
