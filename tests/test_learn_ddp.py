"""Mask learning across 2 processes (gloo on CPU): every rank ends with the same valid plan."""
import os
import socket

import torch
import torch.multiprocessing as mp

import patchc
from test_learn_helpers import TILE, calib_batches, single_thread, tiny_llama_model  # noqa: F401


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    import torch.distributed as dist

    from patchc.learn import LearnConfig, learn_masks

    torch.set_num_threads(1)
    # the environment torchrun would set: learn_masks joins the process group by itself
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        model = tiny_llama_model(seed=0)
        cfg = LearnConfig(tile=TILE, steps=4, lr=1e-2, mode="joint", target_sparsity=0.3, progress=False,
                          checkpoint_dir=os.path.join(tmp, "ckpt"), checkpoint_every=2)
        plan = learn_masks(model, calib_batches(8, batch_size=2), cfg)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        plan.save(os.path.join(tmp, f"plan{rank}.safetensors"))
        # only rank 0 writes shared files
        written = sorted(os.listdir(os.path.join(tmp, "ckpt")))
        with open(os.path.join(tmp, f"files{rank}.txt"), "w") as f:
            f.write(" ".join(written))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree(tmp_path):
    with socket.socket() as sock:          # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    p0 = patchc.MaskPlan.load(tmp_path / "plan0.safetensors")
    p1 = patchc.MaskPlan.load(tmp_path / "plan1.safetensors")
    assert set(p0) == set(p1)
    for n in p0:
        assert torch.equal(p0[n].mask, p1[n].mask) and torch.equal(p0[n].tile_kind, p1[n].tile_kind)
    p0.validate()
    assert abs(p0.sparsity() - 0.3) <= 0.005
    assert "learn_ckpt.json" in (tmp_path / "files0.txt").read_text()
