"""The fine-tuner and the Monitor under torch.distributed (2 gloo processes on the CPU)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from spawn_util import spawn  # noqa: E402


def _worker(rank, world, init_file, out_dir, cache):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import snn
        from test_snn import _trained_tiny_resnet
        ann, batches = _trained_tiny_resnet(steps=10)
        net = snn.convert(ann)
        mine = batches[rank::world][:4]  # each rank sees different data
        snn.finetune(ann, net, mine, epochs=1, lr=1e-2, progress=False, log=lambda s: None, cache=cache)
        with snn.Monitor(ann, net) as mon:
            mon.run(mine[0][0])
            s = mon.summary()
        torch.save({"sd": net.ann_state_dict(), "samples": s["samples"]}, os.path.join(out_dir, f"r{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cache", [False, True])  # the prefix cache: each rank caches its own batches
def test_finetune_under_ddp_keeps_ranks_identical(tmp_path, cache):
    world = 2
    spawn(_worker, world, world, str(tmp_path / "init"), str(tmp_path), cache)
    r0 = torch.load(tmp_path / "r0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "r1.pt", weights_only=True)
    assert r0["samples"] == r1["samples"] == 64  # summary reduced over both ranks (2 x 32)
    for k in r0["sd"]:
        assert torch.allclose(r0["sd"][k], r1["sd"][k], atol=1e-6), k
