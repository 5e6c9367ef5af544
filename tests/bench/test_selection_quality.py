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
