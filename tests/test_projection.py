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


# -- matrix generation (version 2: packed words expanded through a sign table) --------------------

def test_packed_rademacher_is_balanced_and_independent_of_rows_and_dtype():
    from hf_less.projection import expand_signs, packed_signs

    full = projection_block("rademacher", 5, 2, BLOCK_ROWS, 100)
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert abs(full.mean().item()) < 0.01  # 409,600 fair signs
    # A block's rows do not depend on how many of them are asked for, nor on the dtype.
    torch.testing.assert_close(projection_block("rademacher", 5, 2, 37, 100), full[:37], rtol=0, atol=0)
    bf16 = projection_block("rademacher", 5, 2, BLOCK_ROWS, 100, dtype=torch.bfloat16)
    assert torch.equal(bf16.float(), full)
    # Entry 32 c + j is +1 iff bit j of word c is set.
    words = packed_signs(5, 2, 100)
    assert words.shape == (BLOCK_ROWS, 4) and int(words.max()) < 2**32 and int(words.min()) >= 0
    bit = (words[7, 1].item() >> 3) & 1
    assert full[7, 32 + 3].item() == (1.0 if bit else -1.0)
    assert torch.equal(expand_signs(words[:3], 100), full[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_matrix_is_the_same_on_the_gpu():
    for kind in ("rademacher", "gaussian"):
        cpu = projection_block(kind, 1, 3, 500, 64)
        gpu = projection_block(kind, 1, 3, 500, 64, device="cuda")
        assert torch.equal(gpu.cpu(), cpu)


def test_identity_names_the_generation_version():
    from hf_less.projection import MATRIX_VERSION

    assert RandomProjector(10, 4).identity["version"] == MATRIX_VERSION == 2


# -- reduced precision ---------------------------------------------------------------------------

def gradient_like(rows, P, seed=0):
    """Heavy-tailed rows with a shared direction, like per-example gradients."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, P, generator=g)
    scale = torch.exp(torch.randn(1, P, generator=g))  # coordinates of very different sizes
    return (base + torch.randn(rows, P, generator=g)) * scale


def test_auto_precision():
    from hf_less.projection import AUTO_BF16_ENTRIES

    assert RandomProjector(5000, 256).precision == "float32"  # small: exact
    assert RandomProjector(AUTO_BF16_ENTRIES // 8192, 8192).compute_dtype == torch.bfloat16
    assert RandomProjector(AUTO_BF16_ENTRIES, 8192, kind="gaussian").precision == "float32"
    with pytest.raises(ValueError, match="needs kind='rademacher'"):
        RandomProjector(10, 4, kind="gaussian", precision="bfloat16")
    with pytest.raises(ValueError, match="Unknown precision"):
        RandomProjector(10, 4, precision="float16")


def test_bfloat16_projection_is_within_tolerance_of_float32():
    # +-1 is exact in bfloat16; only the gradient side and each block's output are rounded.
    P, d = 3 * BLOCK_ROWS + 123, 1024
    x = gradient_like(12, P)
    exact = RandomProjector(P, d, seed=4, precision="float32")(x)
    fast = RandomProjector(P, d, seed=4, precision="bfloat16")(x)
    rel = ((fast - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert rel < 5e-3, rel  # about 2^-9 / sqrt(3) per coordinate, twice
    n = torch.nn.functional.normalize
    cos_err = (n(fast, dim=1) @ n(fast, dim=1).T - n(exact, dim=1) @ n(exact, dim=1).T).abs().max()
    assert cos_err < 1e-3, cos_err  # far below the projection's own error ~ 1/sqrt(d) = 0.03


def test_bfloat16_projection_does_not_depend_on_batch_or_chunking():
    P, d = BLOCK_ROWS + 700, 256
    x = gradient_like(9, P, seed=1)
    proj = RandomProjector(P, d, seed=0, precision="bfloat16")
    full = proj(x)
    rows = torch.cat([RandomProjector(P, d, seed=0, precision="bfloat16")(x[i : i + 1]) for i in range(9)])
    torch.testing.assert_close(rows, full, rtol=1e-2, atol=1e-3 * full.abs().max().item())
    cut = 2500
    chunked = proj.project(x[:, :cut], 0) + proj.project(x[:, cut:], cut)
    torch.testing.assert_close(chunked, full, rtol=1e-2, atol=1e-2 * full.abs().max().item())


def test_cache_keeps_the_first_blocks_of_a_sweep():
    P, d = 4 * BLOCK_ROWS, 64
    block_bytes = BLOCK_ROWS * d * 4
    proj = RandomProjector(P, d, cache_bytes=2 * block_bytes + 10)
    x = torch.randn(2, P)
    a = proj(x)
    assert sorted(k for k, *_ in proj._cache) == [0, 1] and proj._cached_bytes <= proj.cache_bytes
    torch.testing.assert_close(proj(x), a, rtol=0, atol=0)  # cached and regenerated blocks agree
    assert sorted(k for k, *_ in proj._cache) == [0, 1]
