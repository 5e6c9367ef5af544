"""Seeded random projections: determinism, device-independent generators, scaling, chunking, JL."""

import math

import pytest
import torch

from hf_less.gradients.projection import (BLOCK_ROWS, MATRIX_VERSIONS, RandomProjector, RowShiftProjector, SparseProjector,
                                          make_projector, projection_block)

from tests.testing_utils import dense_matrix, naive_adam, needs_cxx, py_rademacher, py_sparse_matrix


@pytest.mark.parametrize("kind", ["rowshift", "rademacher", "gaussian", "sparse"])
def test_project_equals_dense_matmul_and_chunks_add_up(kind):
    P, d = BLOCK_ROWS + 1000, 64
    x = torch.randn(5, P)
    proj = make_projector(P, d, kind, seed=3)
    R = dense_matrix(P, d, kind, 3)
    torch.testing.assert_close(proj(x), x @ R, rtol=1e-4, atol=1e-4)
    cut = 3001  # a slice boundary inside a block
    chunked = proj.project(x[:, :cut], 0) + proj.project(x[:, cut:], cut)
    torch.testing.assert_close(chunked, x @ R, rtol=1e-4, atol=1e-4)


def test_rademacher_bits_follow_the_documented_hash():
    # Rows far apart, inside and across blocks, and columns in several words.
    seed, d = 12345, 100
    for row in (0, 1, 4095, 4096, 70001):
        got = projection_block("rademacher", seed, row // BLOCK_ROWS, row % BLOCK_ROWS + 1, d)[row % BLOCK_ROWS]
        want = torch.tensor([py_rademacher(seed, row, c) for c in range(d)])
        assert torch.equal(got, want), row


def test_rademacher_rows_do_not_depend_on_the_request():
    from hf_less.gradients.projection import rademacher_words

    whole = rademacher_words(7, 4000, 300, 200)
    assert torch.equal(rademacher_words(7, 4100, 10, 200), whole[100:110])
    # A block's first rows are the same whatever number of rows is asked for.
    assert torch.equal(projection_block("rademacher", 7, 1, 37, 64), projection_block("rademacher", 7, 1, 500, 64)[:37])


def test_rademacher_columns_are_nearly_orthogonal():
    # R^T R / P -> I: no correlation between columns (neighbouring bits of one word, or neighbouring words).
    P, d = 20000, 96
    R = projection_block("rademacher", 0, 0, BLOCK_ROWS, d)
    for k in range(1, math.ceil(P / BLOCK_ROWS)):
        R = torch.cat([R, projection_block("rademacher", 0, k, min(BLOCK_ROWS, P - k * BLOCK_ROWS), d)])
    gram = R.T @ R / P
    off = gram - torch.eye(d)
    assert off.abs().max() < 5 / math.sqrt(P), off.abs().max()  # about 1/sqrt(P) each
    # Neighbouring rows (consecutive counters) are uncorrelated: their correlations average 0 with
    # the variance 1/d of independent rows.
    adjacent = (R[:-1] * R[1:]).sum(1) / d
    assert abs(adjacent.mean()) < 0.01 and abs(adjacent.square().mean() * d - 1) < 0.1


def test_sparse_bits_follow_the_documented_hash_and_each_coordinate_has_unit_norm():
    from hf_less.gradients.projection import sparse_targets

    P, d, nnz = 300, 40, 4
    S = py_sparse_matrix(P, d, 9, nnz)
    eye = torch.eye(P)
    torch.testing.assert_close(SparseProjector(P, d, seed=9, nnz=nnz)(eye).double(), S, rtol=0, atol=1e-7)
    # One entry per slice: s entries of +-1/sqrt(s) per coordinate, so ||S e_j|| = 1 exactly.
    assert ((S != 0).sum(1) == nnz).all() and torch.allclose(S.norm(dim=1), torch.ones(P, dtype=torch.float64))
    t = sparse_targets(9, 0, P, d, nnz)
    assert t.shape == (nnz, P) and int(t.min()) >= 0 and int(t.max()) < 2 * d


def test_sparse_slices_cover_every_output_coordinate():
    from hf_less.gradients.projection import sparse_slices

    for d, s in [(8192, 4), (100, 3), (7, 7), (5, 1)]:
        cuts = sparse_slices(d, s)
        assert sum(w for _, w in cuts) == d and cuts[0][0] == 0
        assert all(a + w == b for (a, w), (b, _) in zip(cuts, cuts[1:]))
    counts = torch.zeros(64)
    counts.index_add_(0, SparseProjector(20000, 64, nnz=4).targets(0, 20000)[0] % 64, torch.ones(20000))
    assert (counts[:16] > 0).all() and (counts[16:] == 0).all()  # slice 0 is [0, 16), filled evenly
    assert counts[:16].std() / counts[:16].mean() < 0.1


@pytest.mark.parametrize("kind", ["rowshift", "sparse", "rademacher", "gaussian"])
def test_inner_products_preserved_in_expectation(kind):
    # E[<Rx, Ry>] = <x, y>: average over many seeds.
    P, d = 200, 16
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, P, generator=g), torch.randn(1, P, generator=g)
    est = torch.stack([(make_projector(P, d, kind, seed=s)(x) * make_projector(P, d, kind, seed=s)(y)).sum()
                       for s in range(400)]).mean()
    exact = (x * y).sum()
    assert abs(est - exact) < 0.15 * x.norm() * y.norm()


def test_rademacher_entries_and_seed():
    b = projection_block("rademacher", 0, 0, 100, 32)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(b, projection_block("rademacher", 0, 0, 100, 32))
    assert not torch.equal(b, projection_block("rademacher", 1, 0, 100, 32))
    assert not torch.equal(b, projection_block("rademacher", 0, 1, 100, 32))


@pytest.mark.parametrize("kind", ["rowshift", "sparse", "rademacher"])
def test_batch_size_does_not_change_projection(kind):
    P, d = 3000, 128
    x = torch.randn(7, P)
    full = make_projector(P, d, kind, seed=0)(x)
    rows = torch.cat([make_projector(P, d, kind, seed=0)(x[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(full, rows, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def _cos(a):
    n = torch.nn.functional.normalize(a, dim=1)
    return n @ n.T


@pytest.mark.parametrize("kind", ["rowshift", "sparse", "rademacher"])
def test_johnson_lindenstrauss_cosines_track_exact(kind):
    # The same data and tolerance for every kind: the sparse projection is held to the dense one's bound.
    P, d = 5000, 2048
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, P, generator=g)
    x = base + torch.randn(20, P, generator=g) * torch.linspace(0.1, 3, 20)[:, None]
    err = (_cos(make_projector(P, d, kind, seed=0)(x)) - _cos(x)).abs().max()
    assert err < 4 / math.sqrt(d)


@pytest.mark.parametrize("kind", ["rowshift", "sparse", "rademacher"])
def test_johnson_lindenstrauss_on_heavy_tailed_gradients(kind):
    # Coordinates of very different sizes (as LoRA gradients have) collide in sparse buckets: s = 4
    # keeps the error within the dense bound, over several seeds.
    P, d = 20000, 2048
    x = gradient_like(16, P, seed=2)
    for seed in range(3):
        err = (_cos(make_projector(P, d, kind, seed=seed)(x)) - _cos(x)).abs().max()
        assert err < 4 / math.sqrt(d), (seed, err)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown projection kind 'count'"):
        make_projector(10, 4, "count")
    for kind in ("sparse", "rowshift"):
        with pytest.raises(ValueError, match="use make_projector for 'sparse' or 'rowshift'"):
            RandomProjector(10, 4, kind=kind)
    with pytest.raises(ValueError, match="Unknown row-shift method 'loop'"):
        make_projector(10, 4, "rowshift", method="loop")
    for kind in ("rowshift", "sparse", "rademacher"):
        with pytest.raises(ValueError, match="proj_dim must be a positive int"):
            make_projector(10, 0, kind)
        with pytest.raises(ValueError, match="Expected vectors of length 10"):
            make_projector(10, 4, kind)(torch.zeros(1, 11))
        with pytest.raises(ValueError, match=r"Coordinates \[8, 11\) fall outside \[0, 10\)"):
            make_projector(10, 4, kind).project(torch.zeros(1, 3), 8)
    with pytest.raises(ValueError, match=r"nnz \(s\) must be an int in \[1, proj_dim=4\]"):
        SparseProjector(10, 4, nnz=5)
    with pytest.raises(ValueError, match="generators count them in 32 bits"):
        SparseProjector(2**32 + 1, 4)


def test_packed_rademacher_is_balanced_and_independent_of_dtype():
    from hf_less.gradients.projection import expand_signs, rademacher_words

    full = projection_block("rademacher", 5, 2, BLOCK_ROWS, 100)
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert abs(full.mean().item()) < 0.01  # 409,600 fair signs
    bf16 = projection_block("rademacher", 5, 2, BLOCK_ROWS, 100, dtype=torch.bfloat16)
    assert torch.equal(bf16.float(), full)
    # Entry 32 c + j is +1 iff bit j of word c is set.
    words = rademacher_words(5, 2 * BLOCK_ROWS, BLOCK_ROWS, 100)
    assert words.shape == (BLOCK_ROWS, 4) and int(words.max()) < 2**32 and int(words.min()) >= 0
    bit = (words[7, 1].item() >> 3) & 1
    assert full[7, 32 + 3].item() == (1.0 if bit else -1.0)
    assert torch.equal(expand_signs(words[:3], 100), full[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_generators_give_the_same_bits_on_the_gpu():
    from hf_less.gradients.projection import rowshift_shifts, rowshift_signs, sparse_targets

    for kind in ("rademacher", "gaussian"):
        cpu = projection_block(kind, 1, 3, 500, 64)
        gpu = projection_block(kind, 1, 3, 500, 64, device="cuda")
        assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(sparse_targets(1, 123456, 5000, 8192, 4, "cuda").cpu(), sparse_targets(1, 123456, 5000, 8192, 4))
    for row0 in (0, 70001):
        assert torch.equal(rowshift_signs(1, row0, 9, 8192, "cuda").cpu(), rowshift_signs(1, row0, 9, 8192))
        assert torch.equal(rowshift_shifts(1, row0, 9, 8192, "cuda").cpu(), rowshift_shifts(1, row0, 9, 8192))
    x = torch.randn(4, 30000)
    # Two GPU runs of the row-shift gather give equal bits (no atomics), also with fresh caches.
    runs = [RowShiftProjector(30000, 512, seed=2)(x.cuda()) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    for kind in ("rowshift", "sparse", "rademacher"):
        kw = {"precision": "float32"} if kind == "rademacher" else {}
        a = make_projector(30000, 512, kind, seed=2, **kw)(x)
        b = make_projector(30000, 512, kind, seed=2, **kw)(x.cuda()).cpu()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_rowshift_bits_follow_the_documented_hash():
    from hf_less.gradients.projection import ROWSHIFT_STREAM, rowshift_shifts, rowshift_signs

    from tests.testing_utils import py_hashed, py_key

    seed, d = 77, 100
    for row in (0, 1, 5, 4096, 70001):
        assert rowshift_shifts(seed, row, 1, d).item() == py_hashed(row, py_key(seed, ROWSHIFT_STREAM)) % d
        want = torch.tensor([py_rademacher(seed, row, c, stream=ROWSHIFT_STREAM + 1) for c in range(d)])
        assert torch.equal(rowshift_signs(seed, row, 1, d)[0], want), row


def test_rowshift_gives_each_coordinate_one_signed_output_and_rows_never_collide_inside():
    P, d = 1000, 64
    S = RowShiftProjector(P, d, seed=4)(torch.eye(P)).double()
    assert ((S != 0).sum(1) == 1).all() and set(S[S != 0].unique().tolist()) == {-1.0, 1.0}
    for k in range(P // d):  # a row's d coordinates land on d different outputs: a cyclic shift
        rows = S[k * d : (k + 1) * d].abs()
        assert torch.equal(rows.sum(0), torch.ones(d, dtype=torch.float64)), k
    # Each whole row covers every output once, so every output takes P div d or P div d + 1 coordinates.
    load = S.abs().sum(0)
    assert load.min() == P // d and load.max() == P // d + 1


def test_rowshift_methods_agree_and_each_is_bitwise_deterministic():
    P, d = 3 * 8192 + 517, 8192
    x = gradient_like(6, P, seed=3)
    out = {}
    for method in ("gather", "scatter"):
        a = RowShiftProjector(P, d, seed=1, method=method)
        b = RowShiftProjector(P, d, seed=1, method=method, cache_bytes=0)  # nothing cached: regenerated
        cut = 10000  # slices that start and end inside rows
        out[method] = a.project(x[:, :cut], 0) + a.project(x[:, cut:], cut)
        assert torch.equal(out[method], b.project(x[:, :cut], 0) + b.project(x[:, cut:], cut)), method
    # The same sum in another order: float32 rounding apart.
    torch.testing.assert_close(out["gather"], out["scatter"], rtol=1e-5, atol=1e-5 * out["scatter"].abs().max().item())


@needs_cxx
def test_compiled_rowshift_fuses_the_adam_direction_and_is_the_dense_matrix():
    """``compile=True``: one compiled pass per slice gives ``Gamma R`` (R built coordinate by coordinate in
    Python), plain gradients give ``x R``, slices add up, and two fresh projectors give the same bits."""
    P, d = 3 * 256 + 77, 256
    g = gradient_like(4, P, seed=5)
    m = torch.randn(P) * 1e-3
    v = torch.rand(P) * 1e-5
    R = dense_matrix(P, d, "rowshift", 2).double()
    cut = 300  # both slices start or end inside a row
    runs = []
    for _ in range(2):
        proj = RowShiftProjector(P, d, seed=2, compile=True, cache_bytes=0)
        adam = (proj.project_adam(g[:, :cut], m[:cut], v[:cut], (0.9, 0.999), 1e-8, 0)
                + proj.project_adam(g[:, cut:], m[cut:], v[cut:], (0.9, 0.999), 1e-8, cut))
        plain = proj.project(g[:, :cut], 0) + proj.project(g[:, cut:], cut)
        assert proj.compile  # compiled, not fallen back
        runs.append((adam, plain))
    ref = torch.stack([naive_adam(row.double(), m.double(), v.double(), 0.9, 0.999, 1e-8) for row in g]) @ R
    torch.testing.assert_close(runs[0][0].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(runs[0][1].double(), g.double() @ R, rtol=1e-5, atol=1e-5)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # The eager path of every kind computes the same direction.
    eager = RowShiftProjector(P, d, seed=2).project_adam(g, m, v, (0.9, 0.999), 1e-8)
    torch.testing.assert_close(eager.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_a_failed_compile_warns_once_and_projects_eagerly(monkeypatch):
    from hf_less.gradients import projection

    def broken(which):
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(projection, "_compiled_rowshift", broken)
    P, d = 600, 128
    g, m, v = gradient_like(3, P, seed=1), torch.randn(P) * 1e-3, torch.rand(P) * 1e-5
    proj = RowShiftProjector(P, d, seed=0, compile=True)
    with pytest.warns(UserWarning, match=r"torch.compile of the row-shift projection failed \(RuntimeError: no C\+\+ "
                                         r"compiler found\); projecting without it"):
        out = proj.project_adam(g, m, v, (0.9, 0.999), 1e-8)
    assert not proj.compile
    expected = RowShiftProjector(P, d, seed=0, method="gather").project_adam(g, m, v, (0.9, 0.999), 1e-8)
    assert torch.equal(out, expected)


def test_rowshift_cache_holds_the_plan_of_each_slice_within_its_bound():
    proj = RowShiftProjector(1000, 64, cache_bytes=600 * 8 + 10, method="scatter")
    x = torch.randn(3, 1000)
    a = proj.project(x[:, :600], 0) + proj.project(x[:, 600:], 600)
    assert proj._cache.keys() == [("scatter", 0, 600, "cpu")]  # the second slice did not fit
    assert torch.equal(a, proj.project(x[:, :600], 0) + proj.project(x[:, 600:], 600))


def test_identity_names_the_generation_version():
    assert RandomProjector(10, 4).identity["version"] == MATRIX_VERSIONS["rademacher"] == 3
    assert SparseProjector(10, 4, nnz=2).identity == {"kind": "sparse", "dim": 4, "seed": 0, "dim_in": 10, "nnz": 2,
                                                      "version": MATRIX_VERSIONS["sparse"]}
    # The method computes the same matrix, so it is not part of the identity.
    assert RowShiftProjector(10, 4, method="gather").identity == RowShiftProjector(10, 4).identity == {
        "kind": "rowshift", "dim": 4, "seed": 0, "dim_in": 10, "version": MATRIX_VERSIONS["rowshift"]}


def test_features_of_another_kind_are_refused():
    from hf_less.gradients.store import IncompatibleFeaturesError, check_compatible

    old = {"projection": SparseProjector(10, 4).identity, "dim": 4}
    new = {"projection": RowShiftProjector(10, 4).identity, "dim": 4}
    with pytest.raises(IncompatibleFeaturesError):
        check_compatible(old, new)


def test_features_of_an_older_generator_are_refused_with_recompute():
    from hf_less.gradients.store import IncompatibleFeaturesError, check_compatible

    new = {"projection": RandomProjector(10, 4).identity, "dim": 4}
    old = {"projection": {**new["projection"], "version": 2}, "dim": 4}
    with pytest.raises(IncompatibleFeaturesError, match="generator changed.*version 2 vs 3.*Recompute"):
        check_compatible(old, new)
    check_compatible(new, dict(new))  # the same generator passes


def test_default_kind_is_rowshift_everywhere():
    import dataclasses
    import inspect

    from hf_less import LessCallback, LessSelector, LessSFTConfig
    from hf_less.cli import FeaturizeArguments
    from hf_less.gradients.featurizer import Featurizer
    from hf_less.gradients.projection import DEFAULT_KIND

    assert DEFAULT_KIND == "rowshift"
    for fn in (LessSelector.__init__, LessCallback.__init__, Featurizer.__init__):
        assert inspect.signature(fn).parameters["proj_kind"].default == DEFAULT_KIND
    fields = {f.name: f.default for f in dataclasses.fields(LessSFTConfig)}
    assert fields["less_proj_kind"] == DEFAULT_KIND
    assert FeaturizeArguments().proj_kind == DEFAULT_KIND


# -- reduced precision ---------------------------------------------------------------------------

def gradient_like(rows, P, seed=0):
    """Heavy-tailed rows with a shared direction, like per-example gradients."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, P, generator=g)
    scale = torch.exp(torch.randn(1, P, generator=g))  # coordinates of very different sizes
    return (base + torch.randn(rows, P, generator=g)) * scale


def test_auto_precision():
    from hf_less.gradients.projection import AUTO_BF16_ENTRIES

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
    # (A Gaussian matrix: a Rademacher one larger than the cache is streamed instead, see below.)
    proj = RandomProjector(P, d, kind="gaussian", cache_bytes=2 * block_bytes + 10)
    x = torch.randn(2, P)
    a = proj(x)
    assert sorted(k for k, *_ in proj._cache.keys()) == [0, 1] and proj._cache.nbytes <= proj.cache_bytes
    torch.testing.assert_close(proj(x), a, rtol=0, atol=0)  # cached and regenerated blocks agree
    assert sorted(k for k, *_ in proj._cache.keys()) == [0, 1]


def test_rademacher_larger_than_the_cache_is_streamed_tile_by_tile_with_the_same_matrix():
    P, d = 3 * BLOCK_ROWS + 333, 96
    x = gradient_like(5, P, seed=7)
    cached = RandomProjector(P, d, seed=6, precision="float32")
    streamed = RandomProjector(P, d, seed=6, precision="float32", cache_bytes=BLOCK_ROWS * d * 4)
    assert not cached.streams and streamed.streams and streamed.tile_rows("cuda") >= BLOCK_ROWS
    want = x.double() @ dense_matrix(P, d, "rademacher", 6).double()
    for proj in (cached, streamed):
        cut = 5000  # slices that start and end inside tiles
        got = proj.project(x[:, :cut], 0) + proj.project(x[:, cut:], cut)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert streamed._cache.keys() == []  # nothing kept
    # Gaussian blocks are drawn per block, so that kind never streams.
    assert not RandomProjector(P, d, kind="gaussian", cache_bytes=0).streams


def test_sparse_cache_holds_the_targets_of_each_slice():
    proj = SparseProjector(1000, 64, nnz=2, cache_bytes=2 * 600 * 8 + 10)
    x = torch.randn(3, 1000)
    a = proj.project(x[:, :600], 0) + proj.project(x[:, 600:], 600)
    assert proj._cache.keys() == [(0, 600, "cpu")]  # the second slice did not fit
    b = proj.project(x[:, :600], 0) + proj.project(x[:, 600:], 600)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
