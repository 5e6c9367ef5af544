"""Quantized feature stores (int8, int4, 1bit): packing, scoring from the packed form, resume, refusals.

The naive references here are written independently of hf_less.gradients.quantize: quantize a
float row with its own absmax (or its signs), dequantize, take plain cosines.
"""

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hf_less import LessCallback, LessSFTConfig
from hf_less.cli.arguments import FeaturizeArguments
from hf_less.gradients import quantize
from hf_less.gradients.quantize import (
    INT_KERNEL_ENV, INT_KERNELS, INT_MATMUL_MAX_DIM, STORE_FORMATS, IntTargets, cosine_rows, decode, encode,
    int_kernel, int_matmul, row_bytes, scales, store_bytes,
)
from hf_less.gradients.store import FeatureStore, IncompatibleFeaturesError
from hf_less.scoring.less import score_store

from tests.testing_utils import interrupt_store, POOL, SHARD_ROWS, STEPS, assert_same_store, naive_dequantized

QUANTIZED = ("int8", "int4", "1bit")


def naive_scores(sel, features: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, sims)`` by the LESS formula from ``{step: (N, d) float features}``, one subtask."""
    sims = 0
    for c, t in zip(sel.checkpoints, sel.target_features):
        p = torch.from_numpy(features[c.step]).double()
        t = t.double()
        cos = (p / p.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
        sims = sims + c.weight * cos
    return sims.mean(1).numpy(), sims.numpy()


@pytest.fixture(scope="module")
def stores(sel, tmp_path_factory):
    """The pool featurized once in every format."""
    root = tmp_path_factory.mktemp("formats")
    return {fmt: sel.featurize(Dataset.from_list(POOL), root / fmt, shard_rows=SHARD_ROWS, dtype=fmt)
            for fmt in STORE_FORMATS}


def test_int8_store_keeps_the_features(sel, reference, stores):
    """Regression: dtype="int8" used to cast unit-norm features to integers, i.e. store zeros."""
    store = stores["int8"]
    for step in STEPS:
        assert np.abs(store.features(step).read(0, len(POOL))).max() > 0.01
    _, sims = sel.score_store(store)
    _, ref_sims = sel.score_store(reference)
    np.testing.assert_allclose(sims, ref_sims, atol=0.01)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_every_format_scores_like_its_naive_dequantized_features(sel, reference, stores, fmt):
    # the float32 reference store holds the exact features; quantize them the naive way
    exact = {s: reference.features(s).read(0, len(POOL)) for s in STEPS}
    deq = {s: naive_dequantized(f, fmt) for s, f in exact.items()}
    store = stores[fmt]
    for s in STEPS:  # the store decodes to the naive dequantized rows
        np.testing.assert_allclose(store.features(s).read(0, len(POOL)), deq[s], rtol=1e-6, atol=1e-7)
        rows = [5, 0, 11, 5]
        np.testing.assert_allclose(store.features(s).take(rows), deq[s][rows], rtol=1e-6, atol=1e-7)
    want_scores, want_sims = naive_scores(sel, deq)
    for chunk_rows in (16384, 4):  # one chunk, and chunks that cross shards
        scores, sims = sel.score_store(store, chunk_rows=chunk_rows)
        np.testing.assert_allclose(sims, want_sims, rtol=0, atol=1e-4)  # the targets' 15-bit rounding
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-4)
    # the float path (codes unpacked to float32) gives the same cosines
    steps, weights = [c.step for c in sel.checkpoints], [c.weight for c in sel.checkpoints]
    float_scores, float_sims = score_store(store, sel.target_features, steps, weights, integer=False)
    np.testing.assert_allclose(float_sims, want_sims, rtol=0, atol=1e-5)
    np.testing.assert_allclose(float_sims, sims, rtol=0, atol=1e-4)
    # and near the exact scores (how near is the format's business: a loose sanity bound)
    exact_sims = naive_scores(sel, exact)[1]
    assert np.abs(sims - exact_sims).max() < {"int8": 0.01, "int4": 0.1, "1bit": 0.5}[fmt]


def test_float_formats_read_as_before(sel, reference, stores):
    f16 = stores["float16"]
    for s in STEPS:
        a = f16.features(s).read(0, len(POOL))
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, reference.features(s).read(0, len(POOL)).astype(np.float16))
    want = naive_scores(sel, {s: f16.features(s).read(0, len(POOL)).astype(np.float32) for s in STEPS})
    got = sel.score_store(f16, chunk_rows=5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", STORE_FORMATS)
def test_shard_files_hold_packed_rows(stores, fmt):
    store = stores[fmt]
    assert store.format == fmt and store.meta["dtype"] == fmt
    assert ("quantization" in store.meta) == (fmt in QUANTIZED)
    shard = store.manifest["shards"][0]
    arr = np.load(store.root / shard["files"][str(STEPS[0])]["name"])
    d = store.meta["dim"]
    assert len(arr) == SHARD_ROWS and arr.nbytes == SHARD_ROWS * row_bytes(fmt, d)
    assert arr.dtype == (np.uint8 if fmt in QUANTIZED else np.dtype(fmt))
    assert arr.nbytes == SHARD_ROWS * {"float32": 4 * d, "float16": 2 * d, "int8": d + 8, "int4": d // 2 + 8,
                                       "1bit": d // 8}[fmt]


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_read_raw_gives_the_stored_rows_of_any_range(stores, fmt):
    """Ranges within a shard, across shards, clipped at the end, and empty, against the shard files."""
    store = stores[fmt]
    step = str(STEPS[0])
    files = [np.load(store.root / s["files"][step]["name"]) for s in store.manifest["shards"]]
    stored = np.concatenate(files)
    array = store.features(STEPS[0])
    n = len(stored)
    for start, stop in [(0, n), (1, 2), (SHARD_ROWS - 1, 2 * SHARD_ROWS + 1), (n - 2, n + 5), (n, n + 3), (4, 4)]:
        got = array.read_raw(start, stop)
        assert got.dtype == stored.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, stored[start:stop])


def test_sizes_at_a_million_rows_meet_the_budget():
    million = {fmt: store_bytes(fmt, 8192, 10**6, 4) for fmt in STORE_FORMATS}
    assert million["float16"] == 10**6 * (4 * 16384 + 16)  # 65.6 GB
    assert million["int8"] <= 33e9 and million["int4"] <= 17e9 and million["1bit"] <= 4.2e9


@pytest.mark.parametrize("bad", ["int16", "bfloat16", "uint8", "fp8", "2bit"])
def test_unknown_formats_are_refused_before_anything_is_written(sel, tmp_path, bad):
    msg = rf"Unknown feature store dtype '{bad}'\. Choose one of float32, float16, int8, int4, 1bit"
    with pytest.raises(ValueError, match=msg):
        sel.featurize(Dataset.from_list(POOL), tmp_path / "s", dtype=bad)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=msg):
        FeatureStore.create(tmp_path / "t", {"dim": 4, "dtype": bad, "checkpoints": [{"step": 1}]})
    assert not (tmp_path / "t").exists()
    with pytest.raises(ValueError, match=msg):
        LessCallback(pool=POOL, dtype=bad)
    with pytest.raises(ValueError, match="less_store_dtype: " + msg):
        LessSFTConfig(output_dir=str(tmp_path / "o"), less_store_dtype=bad, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=msg):
        FeaturizeArguments(store_dtype=bad)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_interrupted_quantized_store_resumes_byte_identical(sel, stores, tmp_path, fmt):
    pool = Dataset.from_list(POOL)
    store = sel.featurize(pool, tmp_path / "s", shard_rows=SHARD_ROWS, dtype=fmt)
    interrupt_store(store.root, 1)
    resumed = sel.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype=fmt)
    assert_same_store(stores[fmt], resumed)


def test_resuming_in_another_format_is_refused(sel, tmp_path):
    pool = Dataset.from_list(POOL)
    store = sel.featurize(pool, tmp_path / "s", shard_rows=SHARD_ROWS, dtype="int8")
    interrupt_store(store.root, 2)
    for other in ("int4", "float16"):
        with pytest.raises(IncompatibleFeaturesError,
                           match=rf"differ in dtype.*It is a int8 store and this run writes {other}: resume with "
                                 r"dtype='int8', use another directory"):
            sel.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype=other)
    # the refusal touched nothing: the same format still resumes
    assert FeatureStore(store.root).num_rows == 2 * SHARD_ROWS
    assert sel.featurize(pool, store.root, shard_rows=SHARD_ROWS, dtype="int8").complete


def test_a_store_whose_rows_do_not_match_its_format_is_refused(stores, tmp_path):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(stores["int4"].root, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["dtype"] = "int8"  # int4 rows read as int8 would be garbage
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds uint8 rows of 40 bytes; a int8 store of d=64 has uint8 rows of 72: the store is damaged"):
        FeatureStore(broken).features(STEPS[0])


# -- packing and unpacking, on arbitrary rows ---------------------------------------------------------

rows_strategy = st.integers(1, 37).flatmap(lambda d: hnp.arrays(
    np.float32, st.tuples(st.integers(1, 5), st.just(d)),
    elements=st.floats(-1, 1, width=32, allow_subnormal=False)))


@given(rows_strategy)
def test_packing_round_trips(x):
    n, d = x.shape
    for fmt in STORE_FORMATS:
        packed = encode(x, fmt)
        assert len(packed) == n and packed.nbytes == n * row_bytes(fmt, d)
        got = decode(packed, fmt, d)
        assert got.shape == (n, d)
        np.testing.assert_allclose(got, naive_dequantized(x, fmt), rtol=1e-6, atol=1e-7)
        # the scoring view is the decoded rows divided by their scale
        np.testing.assert_allclose(cosine_rows(packed, fmt, d).numpy() * scales(packed, fmt, d)[:, None], got,
                                   rtol=1e-6, atol=1e-7)
        # decoding is exact on what was decoded: packing it again gives the same bytes
        if fmt not in ("float16",):
            np.testing.assert_array_equal(encode(got, fmt), packed)
    absmax = np.abs(x).max(1, keepdims=True)
    assert (np.abs(decode(encode(x, "int8"), "int8", d) - x) <= absmax / 127 / 2 * (1 + 1e-5) + 1e-12).all()
    assert (np.abs(decode(encode(x, "int4"), "int4", d) - x) <= absmax / 7 / 2 * (1 + 1e-5) + 1e-12).all()
    bits = decode(encode(x, "1bit"), "1bit", d)
    np.testing.assert_array_equal(bits > 0, x > 0)
    np.testing.assert_allclose(np.linalg.norm(bits, axis=1), 1.0, rtol=1e-6)


@given(rows_strategy, st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_integer_product_gives_the_cosines_of_the_decoded_rows(x, n_targets, seed):
    n, d = x.shape
    targets = torch.from_numpy(np.random.default_rng(seed).standard_normal((n_targets, d))).float()
    targets[0] = 0 if n_targets > 1 and seed % 3 == 0 else targets[0]  # a zero target: zero cosines
    prepared = IntTargets(targets)
    t = targets.double() / targets.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    for fmt in ("int8", "int4", "1bit"):
        deq = torch.from_numpy(naive_dequantized(x, fmt)).double()
        want = (deq / deq.norm(dim=1, keepdim=True).clamp_min(1e-300)) @ t.T
        got = prepared.cosines(encode(x, fmt), fmt)
        assert got.shape == (n, n_targets) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4)


@pytest.mark.parametrize("kernel", INT_KERNELS)
@pytest.mark.parametrize("n, d, c", [(1, 1, 1), (300, 1500, 3), (257, 2048, 16), (3, INT_MATMUL_MAX_DIM, 2)])
def test_int_matmul_kernels_give_the_exact_integer_product(kernel, n, d, c):
    g = torch.Generator().manual_seed(n + d + c)
    q = torch.randint(-127, 128, (n, d), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (d, c), generator=g, dtype=torch.int8)
    if d == INT_MATMUL_MAX_DIM:  # the largest sums int32 holds: every product 127 * 127, of either sign
        q[:], w[:] = 127, 127
        w[:, 1] = -127
    want = q.numpy().astype(np.int64) @ w.numpy().astype(np.int64)
    got = int_matmul(q, w, kernel)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)


def test_both_kernels_give_the_same_cosines_bit_for_bit(monkeypatch):
    x = np.random.default_rng(0).standard_normal((600, 3000)).astype(np.float32)
    targets = IntTargets(torch.randn(5, 3000, generator=torch.Generator().manual_seed(0)))
    for fmt in ("int8", "int4", "1bit"):
        got = {}
        for kernel in INT_KERNELS:
            monkeypatch.setenv(INT_KERNEL_ENV, kernel)
            got[kernel] = targets.cosines(encode(x, fmt), fmt)
        assert torch.equal(got["int_mm"], got["float_blocks"]), fmt


def test_the_kernel_is_timed_once_and_can_be_forced(monkeypatch):
    monkeypatch.delenv(INT_KERNEL_ENV, raising=False)
    monkeypatch.setattr(quantize, "_chosen_kernel", None)
    chosen = int_kernel()
    assert chosen in INT_KERNELS and quantize._chosen_kernel == chosen and int_kernel() == chosen
    monkeypatch.setenv(INT_KERNEL_ENV, "int_mm")
    assert int_kernel() == "int_mm"
    monkeypatch.setenv(INT_KERNEL_ENV, "vnni")
    with pytest.raises(ValueError, match="HF_LESS_INT_KERNEL='vnni' is not a kernel.*int_mm, float_blocks"):
        int_kernel()
    with pytest.raises(ValueError, match="Unknown integer matmul kernel 'vnni'"):
        int_matmul(torch.zeros(1, 1, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.int8), "vnni")


def test_float_blocks_is_not_used_below_the_highest_matmul_precision(monkeypatch):
    """At a lower float32 matmul precision the matmul may round its inputs: only ``_int_mm`` stays exact."""
    monkeypatch.delenv(INT_KERNEL_ENV, raising=False)
    monkeypatch.setattr(quantize, "_chosen_kernel", "float_blocks")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert int_kernel() == "int_mm"
    finally:
        torch.set_float32_matmul_precision(before)


def test_without_an_exact_kernel_scoring_takes_the_float_path(monkeypatch, sel, stores):
    """No ``_int_mm`` and a lowered matmul precision: no exact integer kernel, so codes are unpacked to float."""
    from hf_less.gradients.quantize import integer_product

    steps, weights = [c.step for c in sel.checkpoints], [c.weight for c in sel.checkpoints]
    monkeypatch.delenv(INT_KERNEL_ENV, raising=False)
    monkeypatch.delattr(torch, "_int_mm")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not integer_product("int8", 64)
        with pytest.raises(RuntimeError, match="No exact integer matmul here.*set_float32_matmul_precision"):
            int_kernel()
        got = score_store(stores["int8"], sel.target_features, steps, weights)
        want = score_store(stores["int8"], sel.target_features, steps, weights, integer=False)
    finally:
        torch.set_float32_matmul_precision(before)
    np.testing.assert_array_equal(got[1], want[1])


def test_bit_and_nibble_order_is_the_documented_one():
    x = np.zeros((1, 10), dtype=np.float32)
    x[0, [0, 3, 9]] = 1.0  # columns 0 and 3 in byte 0 (bits 0 and 3), column 9 in byte 1 (bit 1)
    assert encode(x, "1bit").tolist() == [[0b00001001, 0b00000010]]
    y = np.array([[7, -7, 0]], dtype=np.float32)  # absmax 7 -> scale 1: codes 7, -7, 0 (+8), padding 8
    packed = encode(y, "int4")
    assert packed[0, :2].tolist() == [15 | (1 << 4), 8 | (8 << 4)]
    assert packed[0, 2:6].view("<f4").tolist() == [1.0] and packed[0, 6:].view("<i4").tolist() == [98]


def test_zero_rows_stay_zero():
    z = np.zeros((2, 9), dtype=np.float32)
    for fmt in ("int8", "int4"):
        assert np.array_equal(decode(encode(z, fmt), fmt, 9), z)
    assert np.allclose(decode(encode(z, "1bit"), "1bit", 9), -1 / math.sqrt(9))  # a zero is no sign: negative
