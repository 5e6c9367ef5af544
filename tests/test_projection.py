"""Seeded random projection: determinism, scaling, chunking, Johnson-Lindenstrauss."""

import math

import pytest
import torch

from hf_less.projection import BLOCK_ROWS, RandomProjector, projection_block


def dense_matrix(P, d, kind, seed):
    """Independent assembly of the whole matrix from its blocks, scaled by 1/sqrt(d)."""
    blocks = []
    for k in range(math.ceil(P / BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, P - k * BLOCK_ROWS)
        blocks.append(projection_block(kind, seed, k, rows, d))
    return torch.cat(blocks) / math.sqrt(d)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_equals_dense_matmul_and_chunks_add_up(kind):
    P, d = BLOCK_ROWS + 1000, 64
    x = torch.randn(5, P)
    proj = RandomProjector(P, d, kind=kind, seed=3)
    R = dense_matrix(P, d, kind, 3)
    torch.testing.assert_close(proj(x), x @ R, rtol=1e-4, atol=1e-4)
    cut = 3001  # a slice boundary inside a block
    chunked = proj.project(x[:, :cut], 0) + proj.project(x[:, cut:], cut)
    torch.testing.assert_close(chunked, x @ R, rtol=1e-4, atol=1e-4)


def test_rademacher_entries_and_seed():
    b = projection_block("rademacher", 0, 0, 100, 32)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(b, projection_block("rademacher", 0, 0, 100, 32))
    assert not torch.equal(b, projection_block("rademacher", 1, 0, 100, 32))
    assert not torch.equal(b, projection_block("rademacher", 0, 1, 100, 32))


def test_batch_size_does_not_change_projection():
    P, d = 3000, 128
    x = torch.randn(7, P)
    proj = RandomProjector(P, d, seed=0)
    full = proj(x)
    rows = torch.cat([RandomProjector(P, d, seed=0)(x[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(full, rows, rtol=1e-5, atol=1e-5)


def test_inner_products_preserved_in_expectation():
    # E[<Rx, Ry>] = <x, y>: average over many seeds.
    P, d = 200, 16
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, P, generator=g), torch.randn(1, P, generator=g)
    est = torch.stack([(RandomProjector(P, d, seed=s)(x) * RandomProjector(P, d, seed=s)(y)).sum()
                       for s in range(400)]).mean()
    exact = (x * y).sum()
    assert abs(est - exact) < 0.15 * x.norm() * y.norm()


def test_johnson_lindenstrauss_cosines_track_exact():
    P, d = 5000, 2048
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, P, generator=g)
    x = base + torch.randn(20, P, generator=g) * torch.linspace(0.1, 3, 20)[:, None]
    proj = RandomProjector(P, d, seed=0)(x)
    cos = lambda a: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T
    err = (cos(proj) - cos(x)).abs().max()
    assert err < 4 / math.sqrt(d)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown projection kind"):
        RandomProjector(10, 4, kind="sparse")
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        RandomProjector(10, 0)
    with pytest.raises(ValueError, match="Expected vectors of length 10"):
        RandomProjector(10, 4)(torch.zeros(1, 11))
