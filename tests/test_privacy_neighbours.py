"""One neighbouring relation for private validation sets: add or remove one example (issue 13, major 6).

Every mechanism normalises by the data set's public size n, fixed in advance; |D| itself is private.
The attack of the audit: release U + Lap on D (|D| = 200) and on D plus one example (|D| = 201) and
tell them apart by the grid of the released values. With a public n both grids are the same, and the
exact integer mechanism's likelihood ratio stays within e^ε.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from hf_dpdedup.privacy import SCORE_GRID, LaplaceSampler, NaiveLaplaceValidator, PrivateDataset, SVTSession
from hf_dpdedup.privacy import release_utility


def score_examples(model, batch):  # the "model" is ignored: each example carries its score
    return [float(x) for x in batch]


def datasets(n_public: int = 200):
    d = [1.0 if i % 2 else 0.0 for i in range(200)]
    return (PrivateDataset(d, dataset_id="val", public_size=n_public),
            PrivateDataset(d + [1.0], dataset_id="val", public_size=n_public))


def test_released_values_lie_on_the_public_grid_whatever_the_true_size():
    sampler = LaplaceSampler.seeded_for_tests(0)
    on_grid = {0: 0, 1: 0}
    for which, ds in enumerate(datasets()):
        for _ in range(300):
            release = release_utility(ds, None, score_fn=score_examples, epsilon=1.0, sampler=sampler)
            units = release.value * 200 * SCORE_GRID  # the released float, in public grid units
            on_grid[which] += abs(units - round(units)) < 1e-3
            assert release.scale == pytest.approx(1 / (200 * 1.0))  # the scale does not depend on |D|
    assert on_grid == {0: 300, 1: 300}  # the grid says nothing about |D| (before: 596 of 600 told apart)


def test_the_size_normaliser_is_the_public_one_in_every_mechanism():
    small, large = datasets(n_public=250)
    for ds in (small, large):
        svt = SVTSession(ds, reference=None, score_fn=score_examples, epsilon=1.0, cutoff=1, allowed_drop=0.1,
                         sampler=LaplaceSampler.seeded_for_tests(1))
        assert svt.parameters.size == 250 and svt.to_dict()["public_size"] == 250
        assert "validation_size" not in svt.to_dict()
        svt.close()
        naive = NaiveLaplaceValidator(ds, reference=None, score_fn=score_examples, epsilon_per_query=0.5,
                                      allowed_drop=0.1, sampler=LaplaceSampler.seeded_for_tests(2))
        assert naive.accepts(None) in (True, False)


def test_the_release_likelihood_ratio_between_neighbours_is_within_e_to_the_epsilon():
    """Fixed seed, 4,000 releases per neighbour: no released value is e^ε more likely under one."""
    eps = 1.0
    sampler = LaplaceSampler.seeded_for_tests(3)
    counts = []
    for ds in datasets():
        counts.append(Counter(round(release_utility(ds, None, score_fn=score_examples, epsilon=eps,
                                                    sampler=sampler).value * 200) for _ in range(4000)))
    # bucket by whole examples (the noise scale is SCORE_GRID/ε units = one example per ε)
    for bucket in set(counts[0]) & set(counts[1]):
        a, b = counts[0][bucket], counts[1][bucket]
        if min(a, b) >= 200:  # enough draws for the ratio to be measured within ~15 %
            assert abs(math.log(a / b)) <= eps + 0.35, (bucket, a, b)
