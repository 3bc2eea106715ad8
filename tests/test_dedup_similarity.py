"""Nearest-block matching: exact search equals brute force, self is never matched, sketches recall."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.dedup.similarity import METRICS, SimilarityError, nearest_blocks
from hf_dpdedup.testing import candidate_pool
from hf_dpdedup.errors import HfDpDedupError


def brute_distances(targets: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """All pairwise distances, computed the obvious way in float64 (no matrix trick)."""
    t, c = targets.double(), candidates.double()
    if metric == "l2":
        return torch.cdist(t, c, compute_mode="donot_use_mm_for_euclid_dist")
    if metric == "l1":
        return torch.cdist(t, c, p=1)
    nt, nc = t.norm(dim=1), c.norm(dim=1)
    cos = (t @ c.T) / (nt[:, None] * nc[None, :]).clamp_min(1e-300)
    cos = torch.where((nt[:, None] > 0) & (nc[None, :] > 0), cos, 0.0)
    return 1 - cos.clamp(-1, 1)


def brute_force(targets, candidates, metric, k, exclude):
    d = brute_distances(targets, candidates, metric)
    rows = torch.arange(d.shape[0])[exclude >= 0]
    d[rows, exclude[exclude >= 0]] = float("inf")
    dist, idx = torch.sort(d, dim=1, stable=True)  # ties: smaller index first
    return d, idx[:, :k], dist[:, :k]


@st.composite
def problems(draw, integer: bool):
    n, m, bs = draw(st.integers(1, 6)), draw(st.integers(2, 9)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if integer:  # few distinct values: many exact ties
        targets = torch.randint(-2, 3, (n, bs), generator=g).float()
        candidates = torch.randint(-2, 3, (m, bs), generator=g).float()
    else:
        targets, candidates = torch.randn(n, bs, generator=g), torch.randn(m, bs, generator=g)
    exclude = torch.tensor([draw(st.integers(-1, m - 1)) for _ in range(n)], dtype=torch.long)
    k = draw(st.integers(1, m - int(bool((exclude >= 0).any()))))
    return targets, candidates, exclude, k, draw(st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(problems(integer=True), st.sampled_from(["l2", "l1"]))
def test_exact_equals_brute_force_with_exact_ties(problem, metric):
    targets, candidates, exclude, k, chunk = problem
    got = nearest_blocks(targets, candidates, metric=metric, k=k, exclude_self=exclude, chunk_rows=chunk)
    _, idx, dist = brute_force(targets, candidates, metric, k, exclude)
    assert torch.equal(got.indices, idx)  # integer data: exact distances, so ties must match too
    torch.testing.assert_close(got.distances, dist, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(problems(integer=False), st.sampled_from(METRICS), st.sampled_from(["exact", "sketch"]))
def test_search_matches_brute_force(problem, metric, method):
    targets, candidates, exclude, k, chunk = problem
    got = nearest_blocks(targets, candidates, metric=metric, k=k, exclude_self=exclude, chunk_rows=chunk,
                         method=method, rerank=candidates.shape[0])  # rerank all: sketch must be exact too
    d, _, dist = brute_force(targets, candidates, metric, k, exclude)
    torch.testing.assert_close(got.distances, dist, rtol=1e-5, atol=1e-5)
    # whatever the near-ties, the returned indices have the returned (true) distances
    torch.testing.assert_close(d.gather(1, got.indices), dist, rtol=1e-5, atol=1e-5)
    assert bool((got.indices != exclude[:, None]).all())


@pytest.mark.parametrize("method", ["exact", "sketch"])
@pytest.mark.parametrize("metric", METRICS)
def test_identical_candidates_tie_to_smaller_index(metric, method):
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 513, generator=g)
    candidates = torch.cat([torch.randn(3, 513, generator=g), row * 1.5, row * 1.5, row * 1.5])
    got = nearest_blocks(row, candidates, metric=metric, k=3, chunk_rows=2, method=method, rerank=1)
    assert got.indices.tolist() == [[3, 4, 5]]  # rerank < k: k candidates are still re-ranked
    assert got.distances[0, 0] == got.distances[0, 1] == got.distances[0, 2]


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_target_never_matches_itself(method):
    g = torch.Generator().manual_seed(1)
    base, target = torch.randn(5, 64, generator=g), torch.randn(8, 64, generator=g)
    pool = candidate_pool(base, target)
    got = nearest_blocks(target, pool.parts, k=3, exclude_self=pool.exclude_self, method=method)
    assert not bool((got.indices == pool.exclude_self[:, None]).any())
    assert bool((got.distances > 0).all())  # its own copy (distance 0) was excluded
    assert pool.source(4) == ("base", 4) and pool.source(5) == ("self", 0)


def test_minus_one_means_no_exclusion_not_last_block():
    candidates = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    got = nearest_blocks(candidates[-1:].clone(), candidates, exclude_self=torch.tensor([-1]))
    assert got.indices.tolist() == [[3]] and got.distances.item() == 0.0


def test_cosine_picks_the_most_similar_block():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(1, 100, generator=g)
    other = torch.randn(1, 100, generator=g)
    candidates = torch.cat([-t, other, 7.0 * t + 1e-3 * other, t + other])
    for method in ("exact", "sketch"):
        got = nearest_blocks(t, candidates, metric="cosine", k=4, method=method)
        assert got.indices[0, 0].item() == 2  # parallel, scaled: cosine ≈ 1
        assert got.indices[0, -1].item() == 0  # opposite: distance 2
        assert got.distances[0, 0].item() < 1e-6 and abs(got.distances[0, -1].item() - 2) < 1e-6


def test_zero_blocks_no_nan():
    zeros = torch.zeros(2, 32)
    candidates = torch.cat([torch.zeros(1, 32), torch.ones(2, 32)])
    cos = nearest_blocks(zeros, candidates, metric="cosine", k=3)
    assert torch.equal(cos.distances, torch.ones(2, 3, dtype=torch.float64))  # cos 0 with anything
    assert cos.indices.tolist() == [[0, 1, 2]] * 2  # all tied: index order
    l2 = nearest_blocks(zeros, candidates, metric="l2")
    assert l2.indices.tolist() == [[0], [0]] and l2.distances.sum().item() == 0.0


def test_near_identical_blocks_rank_right_despite_large_norms():
    # ‖a‖² ≈ 4e9 here: the matrix trick in float32 would lose these 1e-2-scale differences, and
    # with 20 near-identical candidates a float32 screen could not even pick the right top k + 4.
    g = torch.Generator().manual_seed(4)
    a = 1000 + torch.randn(1, 4096, generator=g)
    scales = torch.randperm(20, generator=g).double() + 1  # candidate i is (scales[i] / 100)·noise away
    candidates = a + (scales[:, None] / 100).float() * torch.randn(20, 4096, generator=g)
    got = nearest_blocks(a, candidates, k=5, chunk_rows=3)
    expected = torch.linalg.vector_norm((candidates - a).double(), dim=1).argsort()[:5]
    assert got.indices[0].tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", METRICS)
def test_low_precision_inputs_match_their_float32_values(dtype, metric):
    g = torch.Generator().manual_seed(5)
    targets, candidates = torch.randn(6, 300, generator=g).to(dtype), torch.randn(20, 300, generator=g).to(dtype)
    low = nearest_blocks(targets, candidates, metric=metric, k=2)
    ref = nearest_blocks(targets.float(), candidates.float(), metric=metric, k=2)
    assert torch.equal(low.indices, ref.indices)
    torch.testing.assert_close(low.distances, ref.distances)


def test_sketch_recall_on_planted_near_duplicates():
    g = torch.Generator().manual_seed(6)
    n, bs = 300, 2048
    base = torch.randn(n, bs, generator=g) * 0.02
    perm = torch.randperm(n, generator=g)
    target = base[perm] + 0.002 * torch.randn(n, bs, generator=g)  # DP-style noise on shuffled blocks
    target[:10] = target[10:20] + 0.001 * torch.randn(10, bs, generator=g)  # some nearest in the target itself
    pool = candidate_pool(base, target)
    exact = nearest_blocks(target, pool.parts, exclude_self=pool.exclude_self)
    sketch = nearest_blocks(target, pool.parts, exclude_self=pool.exclude_self, method="sketch", sketch_dim=64, rerank=4)
    recall = (sketch.indices == exact.indices).float().mean().item()
    assert recall >= 0.99
    assert bool((exact.indices[:10, 0] == n + 10 + torch.arange(10)).all())
    again = nearest_blocks(target, pool.parts, exclude_self=pool.exclude_self, method="sketch", sketch_dim=64, rerank=4)
    assert torch.equal(again.indices, sketch.indices)  # seeded: deterministic


def test_chunking_does_not_change_the_answer():
    g = torch.Generator().manual_seed(7)
    targets, candidates = torch.randn(9, 70, generator=g), torch.randn(13, 70, generator=g)
    for metric in METRICS:
        a = nearest_blocks(targets, candidates, metric=metric, k=3, chunk_rows=1)
        b = nearest_blocks(targets, [candidates[:5], candidates[5:]], metric=metric, k=3)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.distances, b.distances)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": "linf"},
        {"method": "lsh"},
        {"k": 0},
        {"k": 4},  # 4 candidates, one of them excluded
        {"exclude_self": torch.tensor([4, 0])},
        {"exclude_self": torch.tensor([-2, 0])},
        {"exclude_self": torch.tensor([0.0, 1.0])},
        {"chunk_rows": 0},
        {"method": "sketch", "sketch_dim": 0},
    ],
)
def test_bad_options_raise_typed_errors(kwargs):
    kwargs = {"exclude_self": torch.tensor([0, -1]), **kwargs}
    with pytest.raises(SimilarityError):
        nearest_blocks(torch.randn(2, 8), torch.randn(4, 8), **kwargs)


def test_bad_blocks_raise_typed_errors():
    with pytest.raises(SimilarityError):
        nearest_blocks(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(SimilarityError):
        nearest_blocks(torch.randn(2, 8), torch.randint(0, 3, (4, 8)))
    bad = torch.randn(4, 8)
    bad[2, 3] = float("nan")
    for method in ("exact", "sketch"):
        with pytest.raises(HfDpDedupError, match="NaN"):
            nearest_blocks(torch.randn(2, 8), bad, method=method)
