"""The transfer benchmark's analysis helpers (examples/bench/selection_quality.py): ablation specs, distance
bins, and the tables built from cells. No model is loaded: the cells and scores here are made by hand."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "bench" / "selection_quality.py"


@pytest.fixture(scope="module")
def sq():
    spec = importlib.util.spec_from_file_location("selection_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_round_robin(sims: np.ndarray) -> list[int]:
    """Targets take turns 0, 1, ..., T-1, 0, ...; each takes its most similar untaken row (ties: lowest index)."""
    n, t = sims.shape
    taken, out = set(), []
    while len(out) < n:
        col = sims[:, len(out) % t]
        best = min((i for i in range(n) if i not in taken), key=lambda i: (-col[i], i))
        taken.add(best)
        out.append(best)
    return out


def test_parse_ablation_reads_typed_values_and_refuses_unknown_settings(sq):
    assert sq.parse_ablation("proj_dim=2048,8192") == ("proj_dim", [2048, 8192])
    assert sq.parse_ablation("warmup_fraction=0.1") == ("warmup_fraction", [0.1])
    assert sq.parse_ablation("pool_direction=sgd") == ("pool_direction", ["sgd"])
    for bad in ("projdim=2048", "proj_dim", "proj_dim="):
        with pytest.raises(SystemExit, match="expected NAME=V1,V2 with NAME one of"):
            sq.parse_ablation(bad)


def test_distance_bins_are_slices_of_the_round_robin_ordering(sq):
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((40, 3)).astype(np.float32)
    scores = {"less_sims": sims, "less_score": sims.mean(1)}
    ordering = naive_round_robin(sims)
    bins = sq.distance_bins_of(scores, "less", 4)
    assert bins == [ordering[0:4], ordering[4:8], ordering[12:16], ordering[28:32]]
    with pytest.raises(SystemExit, match="needs 48 ordered pool rows for k = 6; the pool has 40"):
        sq.distance_bins_of(scores, "less", 6)


def _distance_cells(target: str, rep: str, coverage: list[float], losses: list[list[float]]) -> dict:
    return {f"distance|{target}|0.05|{rep}|{i}|{seed}": {"coverage": c, "ot": c / 2, "target_loss": loss}
            for i, (c, per_seed) in enumerate(zip(coverage, losses)) for seed, loss in enumerate(per_seed)}


def test_distance_table_gives_spearman_of_distance_against_the_mean_loss(sq):
    cells = {**_distance_cells("a", "less", [0.1, 0.2, 0.3, 0.4], [[1.0, 1.2], [1.5, 1.5], [2.0, 2.2], [2.1, 2.5]]),
             # rds: the farthest bin trains best; ranks of the losses 2, 3, 4, 1 against 1, 2, 3, 4
             **_distance_cells("a", "rds", [0.1, 0.2, 0.3, 0.4], [[1.0], [1.1], [1.2], [0.5]]),
             # embedding misses a bin: no row
             **_distance_cells("a", "embedding", [0.1, 0.2, 0.3], [[1.0], [1.1], [1.2]])}
    text, rows = sq.distance_table(cells, ["a"], 0.05)
    by_rep = {r["rep"]: r for r in rows}
    assert set(by_rep) == {"less", "rds"}
    assert by_rep["less"]["rho_coverage"] == pytest.approx(1.0)
    assert [b["loss"] for b in by_rep["less"]["bins"]] == pytest.approx([1.1, 1.5, 2.1, 2.3])
    # Pearson of ranks (1, 2, 3, 4) and (2, 3, 4, 1): (-1.5*-0.5 + -0.5*0.5 + 0.5*1.5 + 1.5*-1.5) / 5 = -0.2
    assert by_rep["rds"]["rho_coverage"] == pytest.approx(-0.2)
    assert by_rep["rds"]["rho_ot"] == pytest.approx(-0.2)
    assert "| a | less | 0.100 / 0.200 / 0.300 / 0.400 |" in text
    assert "| rds | -0.20 | -0.20 | 0/1 |" in text


def _cell(loss: float) -> dict:
    return {"target_loss": loss, "value": 0.5, "metric": "mc_accuracy", "n": 5, "sdf": 0.05}


def test_ablation_table_compares_each_value_with_the_base_on_the_same_seeds(sq):
    cells = {
        # random: mean 2.0, sd 0.1 on both targets
        **{f"transfer|{t}|0.05|random|{s}": _cell(v) for t in "ab" for s, v in enumerate([1.9, 2.0, 2.1])},
        # the base on seeds 0 and 1; the ablation ran on seed 0 only, so the base row must use seed 0 only
        "transfer|a|0.05|LESS-topk|0": _cell(1.0), "transfer|a|0.05|LESS-topk|1": _cell(3.0),
        "transfer|b|0.05|LESS-topk|0": _cell(1.5), "transfer|b|0.05|LESS-topk|1": _cell(3.0),
        "ablation|pool_direction=sgd|a|0.05|LESS-topk|0": _cell(2.5),
        "ablation|pool_direction=sgd|b|0.05|LESS-topk|0": _cell(1.2),
    }
    args = argparse.Namespace(pool_direction="adam", analysis_seeds=[0], ablation_methods=["LESS-topk"])
    text = sq.ablation_table(cells, ["a", "b"], 0.05, [("pool_direction", ["sgd"])], args,
                             {("pool_direction", "adam"): {"overlap": 0.25},
                              ("pool_direction", "sgd"): {"overlap": None, "shared": 0.5}})
    # base on seed 0: a 1.0, b 1.5 -> mean 1.25, loss / random (0.5 + 0.75) / 2; sgd: a 2.5, b 1.2
    assert "| pool_direction | adam (base) | LESS-topk | 2 | 1.250 | 0.625 | 2/2 | - | 25.0% | - |" in text
    assert "| pool_direction | sgd | LESS-topk | 2 | 1.850 | 0.925 | 1/2 | 1/2 | - | 50% |" in text


def test_win_table_counts_wins_beyond_the_seed_spread(sq):
    def row(target, method, loss, sd, budget=0.05):
        return {"target": target, "budget": budget, "method": method, "loss": loss, "loss_sd": sd,
                "value": 0.5, "value_sd": 0.0}
    rows = [row("a", "random", 2.0, 0.1), row("b", "random", 2.0, 0.1),
            row("a", "LESS-round_robin", 1.5, 0.2), row("b", "LESS-round_robin", 1.85, 0.1),  # a: beyond; b: not
            row("a", "rds-round_robin", 1.9, 0.1), row("b", "rds-round_robin", 1.0, 0.1),
            row("a", "embedding-round_robin", 1.95, 0.0), row("b", "embedding-round_robin", 2.5, 0.1)]
    text = sq.win_table(rows, ["a", "b"], [0.05])
    assert "| 5% | LESS-round_robin | 1/2 | 0/2 | 0/2 |" in text
    assert "| 5% | embedding-round_robin | 0/2 | 0/2 | 1/2 |" in text
    # LESS-RR against the better cheap one: a: 1.5 vs rds 1.9 (beyond: 1.7 < 1.8); b: 1.85 vs rds 1.0 (cheap beyond)
    assert "| 5% | 1/2 | 1/2 | 1/2 |" in text


def test_transfer_overlap_is_the_mean_pairwise_top_k_overlap(sq):
    # 6 pool rows, 3 targets (one target example each); top-2 per target: {0, 1}, {0, 2}, {3, 4}
    sims = np.array([[0.9, 0.9, 0.0], [0.8, 0.1, 0.0], [0.1, 0.8, 0.0],
                     [0.0, 0.0, 0.9], [0.0, 0.0, 0.8], [0.0, 0.0, 0.0]], dtype=np.float32)
    features = {f"{rep}_sims": sims for rep in sq.REPRESENTATIONS} | {
        "ifd": np.zeros(6), "target_task": np.array(["a", "b", "c"])}
    # pairs: |{0,1} & {0,2}| = 1, others 0 -> mean (1/2 + 0 + 0) / 3
    assert sq.transfer_overlap(features, ["a", "b", "c"], 2 / 6, 6) == pytest.approx(1 / 6)
    assert sq.transfer_overlap(features, ["a"], 2 / 6, 6) is None


def test_ablation_diagnostics_share_of_the_base_top_k(sq):
    # 6 rows, targets a and b; base top-2: a {0, 1}, b {2, 3}; ablation top-2: a {0, 4}, b {2, 3}
    base = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.9], [0.0, 0.8], [0.1, 0.0], [0.0, 0.0]], dtype=np.float32)
    abl = base.copy()
    abl[4, 0], abl[1, 0] = 0.85, 0.05
    features = {f"{rep}_sims": base for rep in sq.REPRESENTATIONS} | {"ifd": np.zeros(6),
                                                                      "target_task": np.array(["a", "b"])}
    got = sq.ablation_diagnostics(features, {**features, "less_sims": abl}, ["a", "b"], 2 / 6, 6)
    assert got["shared"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert got["overlap"] == pytest.approx(0.0)   # a and b select disjoint rows
    assert sq.ablation_diagnostics(features, None, ["a", "b"], 2 / 6, 6) == {"overlap": 0.0}


# -- hubness (issue 25) ------------------------------------------------------------------------------


def test_the_hubs_target_set_is_new_and_keeps_date_understanding_in_the_pool(sq):
    hubs, base = sq.TARGET_SETS["hubs"], sq.TARGET_SETS["base"]
    assert len(hubs["targets"]) >= 4 and set(hubs["quick"]) <= set(hubs["targets"])
    assert not set(hubs["targets"]) & (set(base["targets"]) | set(base["quick"]))
    assert "date_understanding" in hubs["pool_include"] and "date_understanding" not in hubs["targets"]
    assert base["pool_include"] == ()  # the first set's pool is unchanged


def test_pool_include_puts_a_task_first_in_the_pool_and_refuses_a_held_out_one(sq, tmp_path, monkeypatch):
    from hf_less.cli import bigbench
    from tests.testing_utils import make_fake_archive

    monkeypatch.setenv("HF_LESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(bigbench.ARCHIVE_ENV, str(make_fake_archive(tmp_path / "bb.tar.gz")))

    def tokenizer(texts, add_special_tokens=True):  # one token per word is enough to test the splits
        return {"input_ids": [t.split() for t in texts]}

    args = argparse.Namespace(targets=["alpha"], exclude_tasks=[], num_targets=2, num_eval=2, max_chars=300,
                              max_length=100, examples_per_task=3, min_task_examples=2, pool_tasks=1)
    for include in (["delta"], ["beta"]):
        pool, per_target, used = sq.transfer_splits(tokenizer, argparse.Namespace(**vars(args), pool_include=include))
        assert used == include and set(pool["task"]) == set(include) and list(per_target) == ["alpha"]
    with pytest.raises(SystemExit, match=r"--pool_include \['alpha'\] are also targets"):
        sq.transfer_splits(tokenizer, argparse.Namespace(**vars(args), pool_include=["alpha"]))
    few = argparse.Namespace(**{**vars(args), "min_task_examples": 25}, pool_include=["gamma"])
    with pytest.raises(SystemExit, match="--pool_include task 'gamma' has 24 examples that fit; --min_task_examples is 25"):
        sq.transfer_splits(tokenizer, few)


def test_pairwise_overlap_and_the_top_source_tasks_of_a_selection(sq):
    selections = {"a": [0, 1, 2, 3], "b": [0, 1, 4, 5], "c": [6, 7, 8, 9]}
    assert sq.pairwise_overlap(selections) == pytest.approx((2 / 4 + 0 + 0) / 3)
    assert sq.pairwise_overlap({"a": [0]}) is None
    groups = ["hub", "hub", "x", "y", "hub", "z", "p", "q", "r", "s"]
    row = sq.hub_selection_row("LESS-topk", selections, groups)
    # pooled: hub 0,1,0,1,4 = 5 rows; then x, y, z, p: one each; 12 rows in all
    assert row["top_groups"][0] == ("hub", 5) and len(row["top_groups"]) == sq.TOP_GROUPS
    assert row["top_share"] == pytest.approx((5 + 4) / 12)


def test_hub_skew_row_finds_a_row_near_every_target(sq):
    sims = np.random.default_rng(0).uniform(0, 1, (20, 6))  # 20 pool rows, 6 target examples
    flat = sq.hub_skew_row("rds", sims, 2)
    sims[11] = 5.0  # in every target's top 2
    hub = sq.hub_skew_row("less", sims, 2)
    assert hub["max"] == 6 and hub["queries"] == 6 and hub["representation"] == "less"
    assert hub["skew"] > flat["skew"]
    assert 0 < hub["never"] < 1


def test_hub_diagnostics_and_tables_from_hand_made_features(sq):
    # 8 pool rows from tasks t0..t3; 2 target tasks (a, b) with 2 target examples each. LESS: row 0 is a hub (top of
    # every target); rds: each target task picks its own rows. The remedy moves the hub away.
    groups = ["t0", "t0", "t1", "t1", "t2", "t2", "t3", "t3"]
    less = np.array([[0.9] * 4, [0.1] * 4, [0.5, 0.5, 0, 0], [0.4, 0.4, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.4, 0.4],
                     [0] * 4, [0] * 4], dtype=np.float32)
    rds = less.copy()
    rds[0] = 0
    features = {"less_sims": less, "rds_sims": rds, "embedding_sims": rds, "random_sims": rds,
                "ifd": np.zeros(8), "target_task": np.array(["a", "a", "b", "b"])}
    selection, skew = sq.hub_diagnostics(features, {"center": rds}, ["a", "b"], 2 / 8, 8, groups, 2)
    by = {r["method"]: r for r in selection}
    assert set(by) == set(sq.HUB_METHODS) | {"LESS[center]-topk"}
    assert by["LESS-topk"]["overlap"] == pytest.approx(1 / 2)  # a {0, 2}, b {0, 4}
    assert by["rds-topk"]["overlap"] == pytest.approx(0.0)  # a {2, 3}, b {4, 5}
    assert by["LESS[center]-topk"]["overlap"] == pytest.approx(0.0)
    assert by["LESS-topk"]["top_groups"][0] == ("t0", 2)
    assert [r["representation"] for r in skew] == [*sq.REPRESENTATIONS, "less[center]"]
    text = sq.hub_table(selection, skew, 2 / 8, 8, 2)
    assert "| LESS-topk | 50.0% | 100.0% | t0 2, t1 1, t2 1 |" in text
    assert "| less | " in text and "| less[center] | " in text


def test_hub_loss_table_counts_lower_and_raised_beyond_the_spread(sq):
    def cells_of(prefix, losses):  # losses per seed
        return {f"{prefix}|{s}": {"target_loss": v} for s, v in enumerate(losses)}

    cells = {}
    for target, base, remedy in (("a", [1.0, 1.1], [0.5, 0.6]),   # lower beyond the spread
                                 ("b", [1.0, 1.1], [1.0, 1.05]),  # lower, within the spread
                                 ("c", [1.0, 1.0], [2.0, 2.0])):  # raised beyond the spread
        cells |= cells_of(f"transfer|{target}|0.05|LESS-topk", base)
        cells |= cells_of(f"hub|center|{target}|0.05|LESS-topk", remedy)
        cells |= cells_of(f"transfer|{target}|0.05|random", [2.0, 2.0, 2.0])
    text = sq.hub_loss_table(cells, ["a", "b", "c"], 0.05, ["center", "pca1"], [0, 1])
    mean = (0.55 + 1.025 + 2.0) / 3
    ratio = (0.55 / 2 + 1.025 / 2 + 2.0 / 2) / 3
    assert f"| center | 3 | 2 | {mean:.3f} | {(1.05 + 1.05 + 1.0) / 3:.3f} | {ratio:.3f} | 2/3 | 1/3 | 1/3 |" in text
    assert "| pca1 | 0 | - |" in text


def test_variants_are_compared_on_the_seeds_both_sides_have(sq):
    """A remedy trained on seed 0 only meets LESS-topk's seed 0, not the mean of its seeds 0 and 1; with that one
    paired seed, the spread is LESS-topk's own over its seeds at that target, not 0."""
    cells = {"transfer|a|0.05|LESS-topk|0": {"target_loss": 1.0}, "transfer|a|0.05|LESS-topk|1": {"target_loss": 3.0},
             "hub|center|a|0.05|LESS-topk|0": {"target_loss": 1.5},
             "transfer|b|0.05|LESS-topk|0": {"target_loss": 1.0}, "transfer|b|0.05|LESS-topk|1": {"target_loss": 1.2},
             "hub|center|b|0.05|LESS-topk|0": {"target_loss": 0.8}, "hub|center|b|0.05|LESS-topk|1": {"target_loss": 1.0},
             "transfer|c|0.05|LESS-topk|0": {"target_loss": 1.0}, "transfer|c|0.05|LESS-topk|1": {"target_loss": 1.1},
             "hub|center|c|0.05|LESS-topk|0": {"target_loss": 2.0}}
    text = sq.hub_loss_table(cells, ["a", "b", "c"], 0.05, ["center"], [0, 1])
    # a: 1.5 against 1.0 (seed 0), within LESS-topk's sd of 1.41 there; b: 0.9 against 1.1 on seeds 0 and 1,
    # lower within the spread; c: 2.0 against 1.0 (seed 0), raised beyond LESS-topk's sd of 0.07 there
    assert (f"| center | 3 | 1-2 | {(1.5 + 0.9 + 2.0) / 3:.3f} | {(1.0 + 1.1 + 1.0) / 3:.3f} | - | 1/3 | 0/3 | 1/3 |"
            in text)


def test_base_warmup_is_trained_again_and_checked_against_the_cached_scores(sq, tokenizer, tmp_path):
    """A run copied without its warmup trains it again (no capture) and keeps it only if it reproduces the cached
    LESS cosines; otherwise it stops with the reason and leaves the new checkpoints aside."""
    import shutil

    from datasets import Dataset

    from hf_less.gradients.projection import DEFAULT_KIND
    from tests.testing_utils import make_model, toy_tasks

    pool = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(4, seed=2)])
    targets = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(2, seed=3)])
    args = argparse.Namespace(proj_dim=64, proj_kind=DEFAULT_KIND, pool_direction="adam", max_length=64, batch_size=4,
                              warmup_epochs=2, warmup_fraction=0.5)
    base = make_model(len(tokenizer))
    warm = sq.capture_warmup(base, tokenizer, pool, targets, tmp_path / "warmup", args)
    sims = sq.run_selector(base, tokenizer, warm, targets, args, show_progress=False).score(pool)[1]
    np.savez(tmp_path / "transfer_scores.npz", less_sims=sims)
    assert sq.base_warmup(base, tokenizer, pool, targets, tmp_path, args) == warm  # present: used as it is
    shutil.rmtree(warm)
    assert sq.base_warmup(base, tokenizer, pool, targets, tmp_path, args, sample=3) == warm
    assert sorted(p.name for p in warm.glob("checkpoint-*")) and not (tmp_path / "warmup.partial").exists()
    again = sq.run_selector(base, tokenizer, warm, targets, args, use_captured=False, show_progress=False).score(pool)
    np.testing.assert_allclose(again[1], sims, atol=1e-2)
    shutil.rmtree(warm)
    np.savez(tmp_path / "transfer_scores.npz", less_sims=sims + 0.5)  # scores of another warmup
    with pytest.raises(SystemExit, match="does not reproduce the cached scores"):
        sq.base_warmup(base, tokenizer, pool, targets, tmp_path, args)
    assert not warm.exists() and (tmp_path / "warmup.partial").exists()


def test_remedy_names_carry_their_parameter(sq):
    args = argparse.Namespace(hub_pca_components=3, hub_csls_k=5)
    assert [sq.remedy_name(r, args) for r in sq.HUB_REMEDIES] == ["center", "pca3", "csls5", "sgd"]
    with pytest.raises(SystemExit, match="expected some of center, pca, csls, sgd"):
        sq.remedy_name("whiten", args)


def test_hub_sims_reads_the_captured_features_and_caches_them(sq, tokenizer, tmp_path, monkeypatch):
    from datasets import Dataset

    from hf_less import LessCallback, LessSelector
    from hf_less.gradients.projection import DEFAULT_KIND
    from tests.testing_utils import make_model, run_warmup, toy_tasks

    pool = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(4, seed=2)])
    targets = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(2, seed=3)])
    run_warmup(tmp_path / "warmup", tokenizer, LessCallback(pool=pool, targets=targets, proj_dim=64, max_length=64,
                                                            show_progress=False))
    args = argparse.Namespace(proj_dim=64, proj_kind=DEFAULT_KIND, pool_direction="adam", max_length=64, batch_size=4,
                              hub_pca_components=1, hub_csls_k=2)
    base = make_model(len(tokenizer))
    plain = LessSelector(make_model(len(tokenizer)), tmp_path / "warmup", targets, tokenizer=tokenizer, proj_dim=64,
                         max_length=64, show_progress=False).score(pool)[1]
    assert sq.hub_sims(base, tokenizer, pool, targets, tmp_path, args, "center", compute=False) is None
    from hf_less.gradients.featurizer import Featurizer

    calls = []
    featurize = Featurizer.__call__
    monkeypatch.setattr(Featurizer, "__call__", lambda self, encoded, moments, *a, **k: calls.append(
        moments is not None) or featurize(self, encoded, moments, *a, **k))
    for remedy in ("center", "csls"):
        sims = sq.hub_sims(base, tokenizer, pool, targets, tmp_path, args, remedy)
        assert sims.shape == plain.shape and np.abs(sims - plain).max() > 1e-3
        again = sq.hub_sims(base, tokenizer, pool, targets, tmp_path, args, remedy, compute=False)
        np.testing.assert_array_equal(again, sims)  # from OUT/hub/NAME/less_sims.npz
    np.testing.assert_allclose(sq.hub_sims(base, tokenizer, pool, targets, tmp_path, args, "csls"),
                               plain - np.sort(plain, 1)[:, -2:].mean(1, keepdims=True), atol=1e-5)
    assert (tmp_path / "hub" / "csls2" / "less_sims.npz").exists()
    assert not any(calls)  # no pool example featurized again: the captured features are read


# -- store formats (issue 24) ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,atol", [("int8", 2e-3), ("1bit", 2e-2)])
def test_format_sims_score_the_capture_as_a_store_written_in_the_format(sq, tokenizer, tmp_path, monkeypatch, fmt,
                                                                        atol):
    from datasets import Dataset

    from hf_less import LessCallback, LessSelector
    from hf_less.gradients.featurizer import Featurizer
    from hf_less.gradients.projection import DEFAULT_KIND
    from tests.testing_utils import make_model, run_warmup, toy_tasks

    pool = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(4, seed=2)])
    targets = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in toy_tasks(2, seed=3)])
    run_warmup(tmp_path / "warmup", tokenizer, LessCallback(pool=pool, targets=targets, proj_dim=64, max_length=64,
                                                            show_progress=False))
    args = argparse.Namespace(proj_dim=64, proj_kind=DEFAULT_KIND, pool_direction="adam", max_length=64, batch_size=4)
    base = make_model(len(tokenizer))
    assert sq.format_sims(base, tokenizer, pool, targets, tmp_path, args, fmt, compute=False) is None
    calls = []
    featurize = Featurizer.__call__
    monkeypatch.setattr(Featurizer, "__call__", lambda self, encoded, moments, *a, **k: calls.append(
        moments is not None) or featurize(self, encoded, moments, *a, **k))
    in_order = sq.format_sims(base, tokenizer, pool, targets, tmp_path, args, fmt)  # the capture's own order
    np.testing.assert_array_equal(sq.format_sims(base, tokenizer, pool, targets, tmp_path, args, fmt, compute=False),
                                  in_order)  # cached in OUT/format/FMT/less_sims.npz
    sq.format_cache(tmp_path, fmt).unlink()
    perm = np.random.default_rng(0).permutation(len(pool))
    shuffled = pool.select(perm)
    sims = sq.format_sims(base, tokenizer, shuffled, targets, tmp_path, args, fmt)  # rows matched by content
    assert not any(calls)  # read from the capture, nothing featurized again
    np.testing.assert_array_equal(sims, in_order[perm])
    # the reference: the pool featurized into a store of that format, then scored (in the shuffled pool's order)
    selector = LessSelector(make_model(len(tokenizer)), tmp_path / "warmup", targets, tokenizer=tokenizer,
                            proj_dim=64, max_length=64, show_progress=False, use_captured=False)
    store = selector.featurize(pool, tmp_path / "store", dtype=fmt)
    want = selector.score_store(store, shuffled)[1]
    np.testing.assert_allclose(sims, want, atol=atol)
    assert np.isfinite(sims).all() == np.isfinite(want).all()


def test_format_agreement_overlap_and_spearman(sq):
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((20, 4)).astype(np.float32)
    features = {f"{rep}_sims": sims for rep in sq.REPRESENTATIONS} | {
        "ifd": np.zeros(20), "target_task": np.array(["a", "a", "b", "b"])}
    same = sq.format_agreement(features, sims.copy(), ["a", "b"], 0.25, 20)
    assert same == {"overlap": 1.0, "spearman": pytest.approx(1.0), "min_spearman": pytest.approx(1.0)}
    flipped = sims.copy()
    flipped[:, 2:] *= -1  # target b's scores reversed: its top 5 are its bottom 5
    got = sq.format_agreement(features, flipped, ["a", "b"], 0.25, 20)
    assert got["overlap"] == pytest.approx(0.5) and got["min_spearman"] == pytest.approx(-1.0)
    assert got["spearman"] == pytest.approx(0.0)
    assert sq.rank_correlation(np.array([1.0, 2.0, -np.inf, 3.0]), np.array([3.0, 2.0, 0.0, 1.0])) == pytest.approx(-1)


def test_format_table_compares_each_format_with_float16_on_the_same_seeds(sq):
    cells = {}
    for seed, (base, int8) in enumerate(((1.0, 0.9), (1.2, 1.0))):
        cells[f"transfer|a|0.05|LESS-topk|{seed}"] = {"target_loss": base}
        cells[f"format|int8|a|0.05|LESS-topk|{seed}"] = {"target_loss": int8}
        cells[f"hub|int8|a|0.05|LESS-topk|{seed}"] = {"target_loss": 9.0}  # another variant's cells: not read
    text = sq.format_table(cells, ["a"], 0.05, {"int8": {"overlap": 0.9, "spearman": 0.99, "min_spearman": 0.98},
                                                "1bit": {"overlap": 0.5, "spearman": 0.8, "min_spearman": 0.7}},
                           [0, 1])
    assert "| int8 | 1 | 2 | 0.950 | 1.100 | - | 1/1 | 0/1 | 0/1 | 90.0% | 0.9900 (0.9800) |" in text
    assert "| 1bit | 0 | - | - | - | - | - | - | - | 50.0% | 0.8000 (0.7000) |" in text


def test_merge_cells_adds_the_missing_cells_of_runs_on_the_same_pool(sq, tmp_path):
    import json

    def run_dir(name, splits, cells):
        d = tmp_path / name
        d.mkdir()
        (d / "pool_tasks.json").write_text(json.dumps({"splits": splits}))
        (d / "cells.json").write_text(json.dumps(cells))
        return d

    out = run_dir("out", "p1", {})
    cells = {"transfer|a|0.05|LESS-topk|0": {"target_loss": 1.0}}
    side = run_dir("side", "p1", {"transfer|a|0.05|LESS-topk|0": {"target_loss": 9.0},
                                  "hub|sgd|a|0.05|LESS-topk|0": {"target_loss": 2.0}})
    assert sq.merge_cells(cells, out, [side]) == 1
    assert cells == {"transfer|a|0.05|LESS-topk|0": {"target_loss": 1.0},
                     "hub|sgd|a|0.05|LESS-topk|0": {"target_loss": 2.0}}
    other = run_dir("other", "p2", {"hub|sgd|b|0.05|LESS-topk|0": {"target_loss": 2.0}})
    with pytest.raises(SystemExit, match="another pool or other targets"):
        sq.merge_cells(cells, out, [other])
    with pytest.raises(SystemExit, match="not a --transfer --out"):
        sq.merge_cells(cells, out, [tmp_path / "missing"])
    assert len(cells) == 2


def test_methods_to_train_keeps_the_chosen_ones_in_order(sq):
    trained, per_target = sq.methods_to_train(["LESS-topk", "random"])
    assert trained == ["random", "LESS-topk"] and per_target == ["LESS-topk"]
    trained, per_target = sq.methods_to_train(None)
    assert trained == [m for m in sq.METHODS if m != "zero-shot"]
    assert per_target == ["LESS-topk", "LESS-round_robin", "LESS-uot", "rds-round_robin", "embedding-round_robin"]
    assert sq.methods_to_train([]) == ([], [])  # --methods alone: only the remedies, formats and ablations
