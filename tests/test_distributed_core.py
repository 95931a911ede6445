"""Sharded projection over 2 gloo processes equals the single-process projection of the whole gradient."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ogpsa_core
from helpers import FlatSlice, float32_rtol, relative_error

LENGTHS = [64, 8, 64, 8, 64, 8, 5, 33, 64, 8, 1, 17]
SPLIT = 100  # rank 0 owns entries [0, 100): the third parameter (64..136) straddles the two partitions


def shard_lengths(rank):
    """Parameter lengths inside rank's partition, and the index of its first parameter."""
    bounds, start = [], 0
    for index, length in enumerate(LENGTHS):
        lo, hi = max(start, 0 if rank == 0 else SPLIT), min(start + length, SPLIT if rank == 0 else sum(LENGTHS))
        if lo < hi:
            bounds.append((index, hi - lo))
        start += length
    return [n for _, n in bounds], bounds[0][0]


def worker(rank, init_file, scope, basis, method, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, sum(LENGTHS), generator=generator)
    grad = torch.randn(sum(LENGTHS), generator=generator)
    lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, sum(LENGTHS))
    lengths, first = shard_lengths(rank)
    grad_slice = FlatSlice(grad[lo:hi].clone(), lengths, first_param=first, num_params=len(LENGTHS), sharded=True,
                           num_pieces=2)
    projector = ogpsa_core.Projector(grad_slice, scope=scope, basis=basis, method=method, scale=0.5)
    projector.set_directions_(directions[:, lo:hi].clone(), step=0)
    stats = projector.project_(diagnostics=True)
    results[rank] = (grad_slice.flat.clone(), projector.basis.clone(), stats)
    dist.destroy_process_group()


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
@pytest.mark.parametrize("basis", ogpsa_core.BASES)
@pytest.mark.parametrize("method", ["orthogonal_projection", "threshold"])
def test_two_rank_sharded_projection_equals_single_process(tmp_path, scope, basis, method):
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, sum(LENGTHS), generator=generator)
    grad = torch.randn(sum(LENGTHS), generator=generator)
    single = FlatSlice(grad.clone(), LENGTHS)
    projector = ogpsa_core.Projector(single, scope=scope, basis=basis, method=method, scale=0.5)
    projector.set_directions_(directions.clone(), step=0)
    expected_stats = projector.project_(diagnostics=True)

    results = mp.Manager().dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(str(tmp_path / "init"), scope, basis, method, results), nprocs=2)
    grads, bases, stats = zip(*(results[r] for r in range(2)))
    # The same sums, split into two partial sums: float32 rounding of sums over the layout (helpers.float32_rtol).
    tol = float32_rtol(sum(LENGTHS), grad.norm() / single.flat.norm())
    assert relative_error(torch.cat(grads), single.flat) < tol
    assert relative_error(torch.cat(bases, dim=1), projector.basis) < float32_rtol(sum(LENGTHS))  # own columns
    assert bases[0].shape == (3, SPLIT)
    for stat in stats:  # diagnostics are global: identical on both ranks
        assert stat.grad_norm == pytest.approx(expected_stats.grad_norm, rel=float32_rtol(sum(LENGTHS)))
        assert stat.grad_norm_projected == pytest.approx(expected_stats.grad_norm_projected, rel=tol)
