"""Selection criteria beyond random / highest deviation (issue 18 item 3), on hand-made deviations and
features where the right answer is known: farthest-point picking, deduplication, per-condition quotas;
and the features themselves (the engine's se_e2_a descriptor, exact; the fallback fingerprint)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from dpsnake.workflow import diversity as D


def _cluster(n=20, seed=0):
    """n points near the origin in 3-D plus three far outliers (rows n, n+1, n+2)."""
    rng = np.random.default_rng(seed)
    pts = rng.normal(scale=0.01, size=(n, 3))
    out = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    return np.concatenate([pts, out])


def test_allocate_splits_evenly_and_passes_unused_shares_on():
    assert D.allocate([10, 10, 10], 10).tolist() == [4, 3, 3]
    assert D.allocate([5, 10, 10], 10).tolist() == [3, 4, 3]  # remainder to the most candidates first
    assert D.allocate([1, 10, 10], 9).tolist() == [1, 4, 4]  # a short condition leaves its share
    assert D.allocate([0, 5], 3).tolist() == [0, 3]
    assert D.allocate([2, 1], 10).tolist() == [2, 1]  # never more than there is
    assert D.allocate([3], 2).tolist() == [2]


def test_farthest_point_picks_the_outliers_after_the_highest_deviation():
    f = _cluster()
    devi = np.full(len(f), 0.1)
    devi[7] = 0.2  # highest deviation: a cluster point, picked first
    pos, dups = D.greedy_pick(devi, 4, "diverse", features=f)
    assert pos.tolist()[0] == 7 and sorted(pos.tolist()[1:]) == [20, 21, 22] and dups == 0
    # highest / random would mostly pick cluster points
    assert D.greedy_pick(devi, 4, "highest")[0].tolist() == [7, 0, 1, 2]
    # an outlier already in the training data is not picked again: the next-farthest is a cluster point
    pos, _ = D.greedy_pick(devi, 3, "diverse", features=f, known=f[[20]] + 0.001)
    assert pos[0] == 7 and sorted(pos.tolist()[1:]) == [21, 22]
    pos, _ = D.greedy_pick(devi, 4, "diverse", features=f, known=f[[20]] + 0.001)
    assert 20 not in pos.tolist()
    # far from everything known: with the training frames at the cluster, outliers still come first
    pos, _ = D.greedy_pick(devi, 3, "diverse", features=f, known=f[:20])
    assert len(set(pos.tolist()[1:]) & {20, 21, 22}) == 2


def test_random_fraction_interleaves_uniform_draws():
    """random_fraction 0.5: picks 0, 2, 4 by the mode, 1, 3, 5 uniform among the rest (the cluster, not
    the outliers, which the diverse mode takes); 0: the mode alone; 1: every pick random; same rng, same picks."""
    f = _cluster(n=60)
    devi = np.full(len(f), 0.1)
    devi[7] = 0.2
    outliers = {60, 61, 62}
    pos, _ = D.greedy_pick(devi, 6, "diverse", np.random.default_rng(1), features=f, random_fraction=0.5)
    pos = pos.tolist()
    assert pos[0] == 7 and {pos[2], pos[4]} <= outliers  # by the mode: highest deviation, then farthest
    assert len(set(pos)) == 6 and all(p not in outliers for p in pos[1::2])  # 60 of 63 candidates: dense
    again, _ = D.greedy_pick(devi, 6, "diverse", np.random.default_rng(1), features=f, random_fraction=0.5)
    assert again.tolist() == pos
    assert D.greedy_pick(devi, 4, "diverse", features=f, random_fraction=0.0)[0].tolist()[1:] != pos[1:4]
    # every pick random: over 20 seeds the outliers come up about as often as their share (3 of 63)
    hits = sum(
        len(
            outliers
            & set(
                D.greedy_pick(devi, 6, "diverse", np.random.default_rng(k), features=f, random_fraction=1.0)[0].tolist()
            )
        )
        for k in range(20)
    )
    assert hits <= 20  # expected 20 x 6 x 3 / 63 = 5.7; farthest-point picks would give 60
    # highest deviation + quotas, a quarter random: picks 3 and 7 are the draws
    devi2 = np.linspace(1.0, 0.1, 40)
    pos, _ = D.greedy_pick(devi2, 8, "highest", np.random.default_rng(0), random_fraction=0.25)
    pos = pos.tolist()
    assert [pos[k] for k in (0, 1, 2, 4, 5, 6)] == sorted(pos[k] for k in (0, 1, 2, 4, 5, 6))
    assert pos[:3] == [0, 1, 2] and len(set(pos)) == 8
    with pytest.raises(ValueError):
        D.greedy_pick(devi, 3, "highest", random_fraction=1.5)


def test_dedup_drops_near_copies_for_every_pick():
    base = np.eye(5) * 3.0
    f = np.concatenate([base, base + 1e-3])  # row k+5 is a near-copy of row k
    devi = np.linspace(0.1, 0.2, 10)
    for mode in ("highest", "random", "diverse"):
        pos, dups = D.greedy_pick(devi, 10, mode, np.random.default_rng(0), features=f, dedup_tol=0.01)
        assert len(pos) == 5 and dups == 5, mode
        assert sorted(p % 5 for p in pos) == [0, 1, 2, 3, 4], mode  # one of each pair
    pos, dups = D.greedy_pick(devi, 10, "highest", features=f, dedup_tol=0.01)
    assert sorted(pos.tolist()) == [5, 6, 7, 8, 9]  # the copies with the higher deviation
    pos, dups = D.greedy_pick(devi, 3, "highest", features=f, dedup_tol=0.01)
    assert pos.tolist() == [9, 8, 7] and dups == 3  # counted: the copies of the picked ones
    pos, dups = D.greedy_pick(devi, 10, "highest", features=f, dedup_tol=None)
    assert len(pos) == 10 and dups == 0
    with pytest.raises(ValueError):
        D.greedy_pick(devi, 3, "diverse")


def test_quota_per_condition():
    devi = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.11, 0.12, 0.13, 0.14])
    groups = np.array([0] * 8 + [1] * 4)  # the hot condition (0) has the highest deviations
    pos, _ = D.greedy_pick(devi, 4, "highest")
    assert sorted(pos.tolist()) == [0, 1, 2, 3]  # without quotas the hot condition takes everything
    pos, _ = D.greedy_pick(devi, 4, "highest", groups=groups)
    assert sorted(pos.tolist()) == [0, 1, 10, 11]
    pos, _ = D.greedy_pick(devi, 5, "highest", groups=groups)
    assert sorted(pos.tolist()) == [0, 1, 2, 10, 11]  # the remainder to the condition with more candidates
    pos, _ = D.greedy_pick(devi, 4, "random", np.random.default_rng(1), groups=groups)
    assert np.bincount(groups[pos]).tolist() == [2, 2]
    pos, _ = D.greedy_pick(devi, 6, "highest", groups=np.array([0] * 11 + [1]))
    assert sorted(pos.tolist()) == [0, 1, 2, 3, 4, 11]  # one candidate at the cold condition: 5 + 1
    # near-copies at the cold condition: its unused share goes to the hot one
    f = np.concatenate([np.eye(8) * 3.0, np.zeros((4, 8)) + 1e-4 * np.arange(4)[:, None]])
    pos, dups = D.greedy_pick(devi, 4, "highest", features=f, dedup_tol=0.01, groups=groups)
    assert sorted(pos.tolist()) == [0, 1, 2, 11] and dups == 3
    # farthest points within quotas
    pos, _ = D.greedy_pick(devi, 4, "diverse", features=f, groups=groups)
    assert np.bincount(groups[pos]).tolist() == [2, 2] and pos[0] == 0


def test_weighted_quota_splits_in_proportion():
    """group_weights: the shares follow the weights (here 3:1 of 4 labels), not the candidate counts; a
    group of weight 0 gets labels only when the weighted ones run out; dropped candidates move shares."""
    devi = np.linspace(0.2, 0.1, 12)
    groups = np.array([0] * 6 + [1] * 6)
    pos, _ = D.greedy_pick(devi, 4, "highest", groups=groups, group_weights=[3.0, 1.0])
    assert np.bincount(groups[pos], minlength=2).tolist() == [3, 1]
    pos, _ = D.greedy_pick(devi, 4, "highest", groups=groups, group_weights=[1.0, 3.0])
    assert np.bincount(groups[pos], minlength=2).tolist() == [1, 3]
    pos, _ = D.greedy_pick(devi, 8, "highest", groups=groups, group_weights=[0.0, 1.0])
    assert np.bincount(groups[pos], minlength=2).tolist() == [2, 6]  # group 1 full: the rest to group 0
    # group ids are weight indices: a weighted group with no candidates here (id 1) takes nothing
    pos, _ = D.greedy_pick(devi, 4, "highest", groups=np.array([0] * 6 + [2] * 6), group_weights=[1.0, 5.0, 1.0])
    assert np.bincount(np.array([0] * 6 + [2] * 6)[pos], minlength=3).tolist() == [2, 0, 2]
    # near copies in the heavy group: its share goes to the other one
    f = np.concatenate([np.zeros((6, 3)) + 1e-4 * np.arange(6)[:, None], np.eye(6, 3) * 3 + np.arange(6)[:, None]])
    pos, dups = D.greedy_pick(devi, 4, "highest", features=f, dedup_tol=0.01, groups=groups, group_weights=[3, 1])
    assert np.bincount(groups[pos], minlength=2).tolist() == [1, 3] and dups == 5
    # fill-ins (above trust hi) fill their own group's share first (docs/workflow.md, quota
    # condition_weighted); in-band candidates of a group with room still come before any fill-in
    g, fill = np.array([0, 0, 1, 1]), np.array([True, True, False, False])
    d4 = np.array([0.5, 0.6, 0.1, 0.12])
    assert D.greedy_pick(d4, 2, "highest", groups=g, fill=fill, group_weights=[10, 1])[0].tolist() == [0, 1]
    assert D.greedy_pick(d4, 2, "highest", groups=g, fill=fill, group_weights=[1, 1])[0].tolist() == [3, 0]
    with pytest.raises(ValueError, match="group_weights need groups"):
        D.greedy_pick(devi, 4, "highest", group_weights=[1.0])
    with pytest.raises(ValueError, match=r"group ids must be 0..1"):
        D.greedy_pick(devi, 4, "highest", groups=np.array([0] * 6 + [2] * 6), group_weights=[1.0, 1.0])


def test_scaled_distances_are_unit_free():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 4))
    a = D.scaled(f)
    assert np.allclose(a - a.mean(0), D.scaled(f * 1e3 + 7) - D.scaled(f * 1e3 + 7).mean(0))
    d = np.linalg.norm(a[:, None] - a[None], axis=2)[np.triu_indices(500, 1)]
    assert np.median(d) == pytest.approx(1.0)  # 1: the typical distance between two frames
    b = D.scaled(np.concatenate([f, [[1e3, 0, 0, 0]]]))  # one far outlier barely changes the scale
    assert np.linalg.norm(b[0] - b[1]) == pytest.approx(np.linalg.norm(a[0] - a[1]), rel=0.02)
    assert np.array_equal(D.scaled(np.ones((3, 2))), np.ones((3, 2)))
    c = D.scaled(np.array([[0.0], [0.0], [0.0], [0.0], [2.0]]))  # mostly copies: the RMS spread (0.8)
    assert c[4, 0] == pytest.approx(2.5)


def test_descriptor_features_are_the_engines(cu_model):
    """In a perfect crystal every atom has the same environment, so the mean descriptor is each atom's:
    the fitting net on it gives the atomic energy the engine's ensemble computes."""
    from dpsnake.engine.ensemble import Ensemble

    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    b = a.copy()
    b.rattle(0.1, seed=1)
    f = D.descriptor_features(cu_model["dp"], [a, b, a])
    ens = Ensemble([cu_model["dp"]])
    rm = ens._rt(np, 0)
    e = ens.evaluate(
        a.positions, np.zeros(len(a), int), np.zeros(len(a), int), a.cell.array[None], np.array([True]), atomic=True
    )["atom_energy"][0]
    y, _ = rm.fittings[0].forward(np, f[:1], keep=False)
    assert y[0, 0] + rm.bias[0] == pytest.approx(float(e[0]), abs=1e-10)
    assert np.allclose(f[0], f[2]) and not np.allclose(f[0], f[1])
    m = ens.models[0]
    assert f.shape == (3, m.ntypes * m.neuron[-1] * m.axis_neuron)
    feats, how = D.frame_features(cu_model["dp"], [a, b], ["Cu"])
    assert np.allclose(feats, f[:2]) and how.startswith("se_e2_a descriptor")


def test_fingerprint_fallback(tmp_path):
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    b = a.copy()
    b.rattle(0.1, seed=1)
    bad = tmp_path / "model.dp"
    bad.write_text("not a model")
    f, how = D.frame_features(bad, [a, b, a], ["Cu"])
    assert "radial distribution fingerprint" in how and "cannot read" in how
    assert np.allclose(f[0], f[2]) and not np.allclose(f[0], f[1])
    from ase.neighborlist import neighbor_list

    # each pair distance spread over two bins: per centre, the histogram sums to the neighbour count
    assert f[1].sum() == pytest.approx(len(neighbor_list("d", b, 6.0)) / len(b))
    f2, how = D.frame_features(tmp_path / "none.dp", [a], ["Cu"])
    assert "no model file" in how and np.allclose(f2[0], f[0])


def test_fill_from_failed_only_fills_shares_the_candidates_leave():
    """Fill-ins (above trust hi) are picked after every in-band candidate of their group, the lowest
    deviation first; with quotas they fill the share of the group that lacks candidates."""
    devi = np.array([0.12, 0.20, 0.15, 0.50, 0.40, 0.90, 0.45, 0.60])
    fill = devi > 0.35
    # one group: 3 candidates, then fill-ins from the lowest deviation (0.40, 0.45)
    pos, _ = D.greedy_pick(devi, 5, "highest", fill=fill)
    assert pos.tolist() == [1, 2, 0, 4, 6]
    pos, _ = D.greedy_pick(devi, 2, "highest", fill=fill)
    assert pos.tolist() == [1, 2]  # enough candidates: no fill-in
    order = D.greedy_pick(devi, 8, "random", np.random.default_rng(3), fill=fill)[0]
    assert set(order[:3].tolist()) == {0, 1, 2} and order[3:].tolist() == [4, 6, 3, 7, 5]
    # two conditions: group 0 holds the candidates, group 1 only fill-ins; 4 labels -> 2 + 2
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pos, _ = D.greedy_pick(devi, 4, "highest", groups=groups, fill=fill)
    assert sorted(pos.tolist()) == [1, 2, 4, 6]
    pos, _ = D.greedy_pick(devi, 4, "highest", groups=groups)  # without the flag all are candidates
    assert sorted(pos.tolist()) == [1, 2, 5, 7]
    # diverse: the first fill-in is the lowest deviation, the next the farthest from what is picked
    f = np.array([[0.0], [0.1], [0.2], [5.0], [1.0], [9.0], [1.1], [3.0]])
    pos, _ = D.greedy_pick(devi, 5, "diverse", features=f, fill=fill)
    assert pos[:3].tolist() == [1, 0, 2] and pos[3] == 4 and pos[4] == 5


def test_kmeanspp_draws_in_proportion_to_squared_distance():
    """k-means++ seeding: with a training frame at the origin, the first pick is candidate j with
    probability d_j^2 / sum d^2 (d = 0, 1, 2, 3, 4 here: 0, 1/30, 4/30, 9/30, 16/30); the copy of the
    training frame is never drawn; after a pick, weights are distances to the nearest of both."""
    f = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    devi = np.full(5, 0.1)
    known = np.array([[0.0]])
    first = [D.greedy_pick(devi, 1, "kmeanspp", np.random.default_rng(s), f, known)[0][0] for s in range(6000)]
    freq = np.bincount(first, minlength=5) / len(first)
    assert freq[0] == 0.0
    assert np.abs(freq - np.array([0, 1, 4, 9, 16]) / 30).max() < 0.02, freq
    # the second pick, after 4 (weights from min(|x - 0|, |x - 4|): 0, 1, 4, 1, 0): 2 half of the time
    pairs = [D.greedy_pick(devi, 2, "kmeanspp", np.random.default_rng(s), f, known)[0] for s in range(6000)]
    second = np.array([p[1] for p in pairs if p[0] == 4])
    assert len(second) > 2500 and set(second.tolist()) <= {1, 2, 3}
    assert abs(np.mean(second == 2) - 4 / 6) < 0.04
    # all distinct, and every candidate once when all are asked for (the copy last: weight 0, no draw)
    pos = D.greedy_pick(devi, 5, "kmeanspp", np.random.default_rng(0), f, known)[0]
    assert sorted(pos.tolist()) == [0, 1, 2, 3, 4] and pos[-1] == 0


def test_kmeanspp_starts_at_the_highest_deviation_and_keeps_quotas():
    """Nothing to measure from (no training frames): the highest deviation first, as diverse; then
    D^2 draws inside each condition's share, in-band candidates before fill-ins."""
    f = _cluster()
    devi = np.full(len(f), 0.1)
    devi[7] = 0.2
    pos = D.greedy_pick(devi, 4, "kmeanspp", np.random.default_rng(1), f)[0]
    assert pos[0] == 7 and len(set(pos.tolist())) == 4
    # the three outliers hold nearly all the squared distance from the cluster: drawn next, nearly always
    hits = [
        set(D.greedy_pick(devi, 4, "kmeanspp", np.random.default_rng(s), f)[0][1:].tolist()) == {20, 21, 22}
        for s in range(200)
    ]
    assert np.mean(hits) > 0.95
    groups = np.arange(len(f)) % 3
    fill = np.zeros(len(f), dtype=bool)
    fill[[0, 3, 6, 9]] = True  # group 0 has fill-ins among its candidates
    for s in range(20):
        pos = D.greedy_pick(devi, 9, "kmeanspp", np.random.default_rng(s), f, groups=groups, fill=fill)[0]
        assert np.bincount(groups[pos], minlength=3).tolist() == [3, 3, 3]
        assert not fill[pos].any()  # group 0 has 4 in-band candidates for its 3 labels
    with pytest.raises(ValueError, match="need features"):
        D.greedy_pick(devi, 2, "kmeanspp", np.random.default_rng(0))
