"""Dist.sum_int beside an NCCL group goes over a gloo host group (train/parallel.py): a host integer
summed without a round trip through the GPU's queue. Two CPU processes, gloo for both groups."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepwish.train.parallel import Dist


def _ranks(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        host = dist.new_group(backend="gloo")
        cpu = torch.device("cpu")
        via_host = Dist(rank, world, rank, cpu, "gloo", host).sum_int(rank + 1)
        via_default = Dist(rank, world, rank, cpu, "gloo").sum_int(10 * (rank + 1))
        alone = Dist(0, 1, 0, cpu, None).sum_int(7)
        torch.save((via_host, via_default, alone), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sum_int_over_the_host_group_and_the_default_one(tmp_path):
    world = 2
    mp.spawn(_ranks, args=(world, f"file://{tmp_path / 'store'}", str(tmp_path / "out")), nprocs=world)
    for r in range(world):
        assert torch.load(tmp_path / f"out.{r}") == (3, 30, 7)
    # the host group is not part of the equality of two Dists
    assert Dist(0, 2, 0, torch.device("cpu"), "gloo", object()) == Dist(0, 2, 0, torch.device("cpu"), "gloo")
