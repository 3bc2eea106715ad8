"""Engine v2 (issue 12): aligned candidates, cost order, confirmation on a second split, utilities
with standard errors — on tiny models whose replaceable set is known."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_dpdedup import DedupedModel
from hf_dpdedup.blocks import BlockRows
from hf_dpdedup.dedup.cost import BlockCosts, replacement_costs
from hf_dpdedup.dedup.live import LiveBlocks
from hf_dpdedup.dedup.plan import PlanConfig, plan_replacements
from hf_dpdedup.dedup.saliency import gradient_moments, input_rms, scale_by_input_rms
from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.search import confirm, run_search
from hf_dpdedup.dedup.tasks import classification_score
from hf_dpdedup.dedup.validate import (
    PublicValidator, example_scores, paired_difference, paired_utility_stats, public_utility_and_scores,
    public_utility_stats,
)
from hf_dpdedup.errors import UnderpoweredValidationWarning
from hf_dpdedup.hub.cards import member_card
from hf_dpdedup.dedup.config import SVT
from hf_dpdedup.privacy import PrivacyMetadata, PrivateDataset
from hf_dpdedup.store.member import read_constitution
from hf_dpdedup.store.records import BeforeAfter

from conftest import tiny_model

BLOCK = 16
OLD = PlanConfig(candidates="nearest", order="saliency", saliency="magnitude", close_ratio=None)


class MLP(nn.Module):
    """fc1 (8 blocks), fc2 (4 blocks + a small bias extra) and a layer the forward never uses."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(8, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mse_loss(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def calibration(n: int = 32, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return [{"x": x, "y": torch.randn(n, 4, generator=g)}]


def bits(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()}


def block_of(live: LiveBlocks, name: str, i: int = 0) -> int:
    return next(s.first_block for s in live.layout.tensors if s.name == name) + i


class PlantedOracle:
    """Accepts iff none of the ``bad`` blocks differs from its original value."""

    def __init__(self, live: LiveBlocks, bad: set[int]) -> None:
        self.live, self.original = live, {b: live.read(b) for b in bad}
        self.validations = 0

    @property
    def halted(self) -> bool:
        return False

    def accepts(self, model) -> bool:
        self.validations += 1
        return all(torch.equal(self.live.read(b), v) for b, v in self.original.items())


def planted_pair(bad_fraction: float = 0.25, seed: int = 0):
    """A base and a target whose blocks moved by growing amounts; the last ``bad_fraction`` of the
    moves (the largest) are the bad ones. Target values include -0.0 and subnormals."""
    base, target = MLP(seed), MLP(seed)
    g = torch.Generator().manual_seed(seed + 1)
    live = LiveBlocks(target, BLOCK)
    with torch.no_grad():
        for i in range(live.n_blocks):
            part = live._slice(i)  # noqa: SLF001 - the test plants values block by block
            signs = torch.randint(0, 2, part.shape, generator=g) * 2.0 - 1
            part.add_((0.01 * (i + 1)) * signs)  # ‖Δ‖ grows with the block index
        target.fc1.weight[0, 0] = -0.0
        target.fc1.weight[0, 1] = 1e-40  # subnormal
    n = live.n_blocks
    bad = set(range(n - int(bad_fraction * n), n))
    return base, target, live, bad


@pytest.mark.parametrize("strategy,options", [
    ("greedy", {"n": 3}), ("binary", {"min_group": 1}), ("halving", {"min_group": 1}),
    ("mcts", {"group": 2, "episodes": 60}),
])
def test_each_strategy_on_a_planted_oracle_finds_the_replaceable_set(strategy, options):
    base, target, live, bad = planted_pair()
    before = bits(target)
    base_matrix = LiveBlocks(base, BLOCK).matrix()
    sequence = plan_replacements(target, live, base_matrix, PlanConfig(cost="delta", use_self=False))
    assert [r.block for r in sequence][-len(bad):] == sorted(bad)  # Δ² order: the planted moves grow
    oracle = PlantedOracle(live, bad)
    result = run_search(strategy, target, live, sequence, oracle, **options)
    kept = {r.block for r in result.accepted}
    good = set(range(live.n_blocks)) - bad
    assert not kept & bad and oracle.accepts(target)
    if strategy == "greedy":  # exactly the groups of 3 without a bad block
        groups = [sequence[i : i + 3] for i in range(0, len(sequence), 3)]
        assert kept == {r.block for g in groups if not {r.block for r in g} & bad for r in g}
    elif strategy in ("binary", "halving"):
        assert kept == good  # a clean cheap-first prefix is found whole
    else:
        assert len(kept) >= len(good) // 2
    # what is applied is exactly the accepted set: base rows there, the original bits elsewhere
    after = LiveBlocks(target, BLOCK).matrix()
    original = LiveBlocks(_with_bits(MLP(), before), BLOCK).matrix()
    for i in range(live.n_blocks):
        expected = base_matrix[i] if i in kept else original[i]
        assert torch.equal(after[i].view(torch.int32), expected.view(torch.int32)), i


def _with_bits(model, state: dict[str, torch.Tensor]):
    model.load_state_dict({k: v.view(torch.float32) for k, v in state.items()})
    return model


def test_rejected_groups_are_reverted_bit_exactly():
    base, target, live, _ = planted_pair()
    before = bits(target)
    bad = {block_of(live, "fc1.weight", 0)}  # holds the -0.0 and the subnormal
    sequence = plan_replacements(target, live, LiveBlocks(base, BLOCK).matrix(),
                                 PlanConfig(cost="delta", use_self=False))
    result = run_search("greedy", target, live, sequence, PlantedOracle(live, bad), n=4)
    assert result.validations == math.ceil(len(sequence) / 4) and len(result.accepted) < len(sequence)
    live.revert(result.undo)
    assert all(torch.equal(before[k], v) for k, v in bits(target).items())  # -0.0 stays -0.0


def test_confirmation_bisects_the_accepted_prefix_and_reverts_the_rest_bit_exactly():
    base, target, live, _ = planted_pair()
    before = bits(target)
    base_matrix = LiveBlocks(base, BLOCK).matrix()
    sequence = plan_replacements(target, live, base_matrix, PlanConfig(cost="delta", use_self=False))
    result = run_search("binary", target, live, sequence, PlantedOracle(live, set()))  # an overfit set
    assert len(result.accepted) == len(sequence)
    first_bad = 9
    live.revert(result.undo)  # the confirmation's oracle remembers the original values
    confirmer = PlantedOracle(live, {sequence[first_bad].block, sequence[first_bad + 3].block})
    result.undo = live.apply(result.accepted)
    confirm(target, live, result, confirmer)
    assert [r.block for r in result.accepted] == [r.block for r in sequence[:first_bad]]
    assert result.rejected_by_confirmation == len(sequence) - first_bad
    assert result.confirmations == confirmer.validations <= 2 + math.ceil(math.log2(len(sequence)))
    kept = {r.block for r in result.accepted}
    original = LiveBlocks(_with_bits(MLP(), before), BLOCK).matrix()
    after = LiveBlocks(target, BLOCK).matrix()
    for i in range(live.n_blocks):
        expected = base_matrix[i] if i in kept else original[i]
        assert torch.equal(after[i].view(torch.int32), expected.view(torch.int32)), i
    live.revert(result.undo)
    assert all(torch.equal(before[k], v) for k, v in bits(target).items())


# --- candidates ---------------------------------------------------------------------------------
def _set_block(live: LiveBlocks, block: int, values: torch.Tensor) -> None:
    with torch.no_grad():
        live._slice(block).copy_(values)  # noqa: SLF001


def small_unrelated_pair():
    """Two small, unrelated blocks of the target; their aligned base blocks are far away."""
    base, target = MLP(0), MLP(0)
    live, base_live = LiveBlocks(target, BLOCK), LiveBlocks(base, BLOCK)
    g = torch.Generator().manual_seed(7)
    a, b = block_of(live, "fc1.weight", 2), block_of(live, "fc1.weight", 5)
    for blk in (a, b):
        _set_block(live, blk, 0.01 * torch.randn(BLOCK, generator=g))
        _set_block(base_live, blk, torch.randn(BLOCK, generator=g))
    return base, target, live, base_live, a, b


def sources(sequence) -> dict[int, tuple[str, int]]:
    return {r.block: (r.source, r.source_block) for r in sequence}


def test_a_small_unrelated_block_is_not_replaced_by_another_small_block_of_the_same_model():
    base, target, live, base_live, a, b = small_unrelated_pair()
    old = sources(plan_replacements(target, live, base_live.matrix(), OLD))
    assert old[a] == ("self", b) or old[b] == ("self", a)  # the paper's nearest-by-L2 pairs them
    new = sources(plan_replacements(target, live, base_live.matrix(), PlanConfig(cost="delta")))
    assert new[a] == ("base", a) and new[b] == ("base", b)  # aligned: the base's block there


def test_a_genuinely_close_self_or_cross_position_block_is_offered():
    base, target = MLP(0), MLP(0)
    live, base_live = LiveBlocks(target, BLOCK), LiveBlocks(base, BLOCK)
    g = torch.Generator().manual_seed(3)
    for i in range(live.n_blocks):  # every block moved well away from its aligned base block
        _set_block(live, i, live.read(i)[: live._slice(i).numel()] + torch.randn(live._slice(i).numel(), generator=g))  # noqa: SLF001
    src, dup = block_of(live, "fc1.weight", 1), block_of(live, "fc1.weight", 6)
    _set_block(live, dup, live.read(src) + 1e-3 * torch.randn(BLOCK, generator=g))  # a near-copy
    cross, far = block_of(live, "fc2.weight", 0), block_of(live, "fc1.weight", 3)
    _set_block(live, cross, base_live.read(far) + 1e-3 * torch.randn(BLOCK, generator=g))
    plan = sources(plan_replacements(target, live, base_live.matrix(), PlanConfig(cost="delta")))
    assert plan.get(dup) == ("self", src) or plan.get(src) == ("self", dup)
    assert plan[cross] == ("base", far)
    others = {b for b, s in plan.items() if s != ("base", b)}
    assert others <= {src, dup, cross}  # nothing else is offered anything but its aligned block
    off = sources(plan_replacements(target, live, base_live.matrix(), PlanConfig(cost="delta", use_self=False)))
    assert all(s == ("base", b) for b, s in off.items())


# --- cost order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cost", ["fisher", "taylor"])
def test_the_cost_order_ranks_a_replacement_of_an_unused_weight_cheapest(cost):
    base, target = MLP(0), MLP(0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for p in target.unused.parameters():
            p.add_(5.0)  # far from the base, large in magnitude, but never used by the forward
    live, base_matrix = LiveBlocks(target, BLOCK), LiveBlocks(base, BLOCK).matrix()
    unused = set(range(block_of(live, "unused.weight"), block_of(live, "unused.bias") + 1))
    assert len(unused) == 9
    kw = dict(calibration=calibration(), loss_fn=mse_loss)
    rows = torch.arange(live.n_blocks)
    deltas = base_matrix.double() - live.matrix().double()
    costs = replacement_costs(target, live.layout, rows, deltas, measure=cost, **kw)
    assert all(costs[b] == 0 for b in unused) and costs.abs().sum() > 0  # zero gradient, zero Fisher
    # (use_self off: the unused blocks, all moved by +5, are near one another — that is another test)
    order = [r.block for r in plan_replacements(target, live, base_matrix, PlanConfig(cost=cost, use_self=False),
                                                **kw)]
    last_unused = max(order.index(b) for b in unused)
    assert all(costs[b] <= 0 for b in order[:last_unused])  # before anything estimated to cost
    if cost == "fisher":
        assert set(order[: len(unused)]) <= unused | {b for b in order if costs[b] == 0}
    by_delta = [r.block for r in plan_replacements(target, live, base_matrix,
                                                   PlanConfig(cost="delta", use_self=False), **kw)]
    assert set(by_delta[-len(unused):]) == unused  # the data-free order puts them last
    by_saliency = [r.block for r in plan_replacements(target, live, base_matrix, OLD, **kw)]
    assert not set(by_saliency[: len(unused)]) & unused  # and so does the paper's magnitude order


# --- confirmation end to end -----------------------------------------------------------------------
def overfit_family():
    """The ε-1 base differs from the ε-8 target in the word embeddings of tokens 60–119 (badly) and
    elsewhere by a hair. The validation split uses tokens 3–59 only, so it cannot see the damage;
    the confirmation split uses tokens 60–119."""
    target = tiny_model("bert", seed=0)
    base = tiny_model("bert", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1e-4 * p.std() * torch.randn(p.shape, generator=g))
        base.bert.embeddings.word_embeddings.weight[60:].add_(
            3.0 * torch.randn(60, 32, generator=g))

    def split(lo, hi, n, seed):
        ids = torch.randint(lo, hi, (n, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            labels = target(input_ids=ids).logits.argmax(-1)
        return [{"input_ids": ids, "labels": labels}]

    members = [Member("eps1", base, PrivacyMetadata(1.0, 1e-5, ("toy",))),
               Member("eps8", target, PrivacyMetadata(8.0, 1e-5, ("toy",)))]
    return members, split(3, 60, 200, 10), split(60, 120, 200, 11), split(3, 120, 200, 12)


@pytest.mark.parametrize("with_confirmation", [False, True])
def test_the_confirmation_catches_an_overfit_validation_set(tmp_path, with_confirmation):
    members, val, conf, test = overfit_family()
    target = members[1].model
    embeddings = target.bert.embeddings.word_embeddings.weight
    original = embeddings.detach().clone()
    data = DedupData(classification_score, public_val=val, public_test=test,
                     public_confirm=conf if with_confirmation else None)
    config = DedupConfig(block_size=128, threshold=0.02, interactive=False)
    report = deduplicate_family(members, data, config, tmp_path / "store")
    (m,) = report.targets
    damaged = not torch.equal(embeddings[60:], original[60:])
    record = read_constitution(tmp_path / "store" / "members" / "eps8").dedup
    card = member_card(read_constitution(tmp_path / "store" / "members" / "eps8"), repo_id="ns/eps8",
                       store_repo="ns/fam-blocks", store_commit="a" * 40).text
    # the stored record and the card say what the search checked on, with its SE, and whether it was confirmed
    assert record.public_validation_accuracy == BeforeAfter(m.val_utility_before, m.val_utility_after, m.val_utility_se,
                                                            m.val_drop_se)
    assert (record.confirmations, record.rejected_by_confirmation) == (m.confirmations, m.rejected_by_confirmation)
    assert f"± {m.val_utility_se:.4g} before" in card
    if not with_confirmation:
        assert damaged and m.confirmations == 0  # the search's set passes on val alone
        assert "no second public split confirmed them" in card
        return
    assert m.confirmations > 1 and m.rejected_by_confirmation > 0
    assert not damaged  # the confirmation reverted what only the other split could see
    assert (f"a second public split the search never saw confirmed them ({m.confirmations} checks, "
            f"{m.rejected_by_confirmation} replacements it rejected were undone)") in card
    checker = PublicValidator(conf, classification_score, reference=_fresh_target(), threshold=0.02)
    assert checker.accepts(target)
    loaded = DedupedModel.from_pretrained(tmp_path / "store" / "members" / "eps8")
    for k, v in target.state_dict().items():  # what is stored is what was validated, bit for bit
        assert torch.equal(loaded.state_dict()[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k


def _fresh_target():
    return tiny_model("bert", seed=0)


# --- utilities with standard errors -------------------------------------------------------------------
def test_utilities_carry_their_standard_error():
    class Fixed(nn.Module):
        def forward(self, s):
            return s

    scores = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    u = public_utility_stats(Fixed(), scores, lambda model, batch: model(batch))
    # mean 3/4; sample variance ((1/4)² · 3 + (3/4)²) / 3 = 1/4; SE √(1/4 / 4) = 1/4
    assert (u.mean, u.se, u.n) == (0.75, 0.25, 4)
    u = public_utility_stats(Fixed(), [torch.tensor([0.5, 0.5, 0.5])], lambda model, batch: model(batch))
    assert (u.mean, u.se, u.n) == (0.5, 0.0, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=7), min_size=1, max_size=5))
def test_one_pass_gives_the_utility_and_the_example_scores_of_two(batches):
    """What the paired floor reads (the previous model's example scores) and its utility come from one
    pass, bit for bit what the two separate calls give."""
    class Fixed(nn.Module):
        def forward(self, s):
            return s

    data = [torch.tensor(b, dtype=torch.float64) for b in batches]
    score = lambda model, batch: model(batch)  # noqa: E731
    utility, scores = public_utility_and_scores(Fixed(), data, score)
    assert utility == public_utility_stats(Fixed(), data, score)
    separate = example_scores(Fixed(), data, score)
    assert len(scores) == len(separate) and all(torch.equal(a, b) for a, b in zip(scores, separate))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=30), st.integers(1, 4))
def test_the_paired_difference_is_the_mean_change_with_its_paired_standard_error(pairs, n_batches):
    after = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    before = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    cut = lambda t: list(torch.tensor_split(t, n_batches))  # noqa: E731  (batches, some maybe empty)
    diff = paired_difference(cut(after), cut(before))
    d = after - before
    assert diff.n == len(pairs) and diff.mean == pytest.approx(float(d.mean()), abs=1e-12)
    # (Σx² − n·mean² loses ~1e-16 of the variance to rounding: ~1e-8 of an SE near 0)
    assert diff.se == pytest.approx(float(d.std(unbiased=True)) / math.sqrt(len(pairs)), abs=1e-6)
    with pytest.raises(ValueError, match="same"):
        paired_difference(cut(after), cut(before)[:-1] if n_batches > 1 else [])


def noisy_family(n: int):
    """Two unrelated tiny models on random labels: replacing blocks flips many predictions both ways,
    so the measured drop stays small while its paired SE on ``n`` examples is large."""
    target, base = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (n, 12), generator=g)
    val = [{"input_ids": ids, "labels": torch.randint(0, 2, (n,), generator=g)}]
    members = [Member("eps1", base, PrivacyMetadata(1.0, 1e-5, ("toy",))),
               Member("eps8", target, PrivacyMetadata(8.0, 1e-5, ("toy",)))]
    return members, val


def test_a_drop_the_validation_data_cannot_resolve_is_warned_about_and_reported(tmp_path):
    members, val = noisy_family(24)
    data = DedupData(classification_score, public_val=val, public_test=val)
    config = DedupConfig(block_size=128, threshold=0.05, interactive=False)
    with pytest.warns(UnderpoweredValidationWarning, match="paired SE") as caught:
        report = deduplicate_family(members, data, config, tmp_path / "s")
    (m,) = report.targets
    assert m.from_base > 0 and m.val_drop_se > 0.05 and m.val_utility_before - m.val_utility_after <= 0.05
    assert "eps8" in str(caught[0].message) and f"{100 * m.val_drop_se:.2f}" in str(caught[0].message)
    record = read_constitution(tmp_path / "s" / "members" / "eps8").dedup
    assert record.public_validation_accuracy.drop_se == m.val_drop_se == m.to_dict()["val_drop_se"]
    assert record.public_test_accuracy.drop_se == m.test_drop_se  # the same examples here: the same SE
    card = member_card(read_constitution(tmp_path / "s" / "members" / "eps8"), repo_id="ns/eps8",
                       store_repo="ns/fam-blocks", store_commit="a" * 40).text
    assert f"drop measured to ± {m.val_drop_se:.4g} (paired SE)" in card


def test_private_validation_decides_on_other_data_so_the_public_figure_is_reported_not_warned(tmp_path):
    members, val = noisy_family(24)
    _, private_rows = noisy_family(300)
    private = PrivateDataset(dict(private_rows[0]), dataset_id="toy", public_size=300, batch_size=100)
    data = DedupData(classification_score, public_val=val, public_test=val, private_val=private)
    config = DedupConfig(block_size=128, threshold=0.05, interactive=False, validation=SVT(epsilon=1.0, cutoff=3),
                         noise_seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderpoweredValidationWarning)
        report = deduplicate_family(members, data, config, tmp_path / "s")
    (m,) = report.targets
    assert m.from_base > 0 and m.val_drop_se > 0.05  # the public figure says "unresolved"; SVT decided


def test_no_warning_when_the_drop_is_resolved(tmp_path):
    members, val, conf, test = overfit_family()  # val cannot see the damage: the drop there is ≈ 0 ± ≈ 0
    data = DedupData(classification_score, public_val=val, public_test=test)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderpoweredValidationWarning)
        report = deduplicate_family(members, data, DedupConfig(block_size=128, threshold=0.02, interactive=False),
                                    tmp_path / "s")
    (m,) = report.targets
    assert m.from_base > 0 and m.val_drop_se <= 0.02
    assert m.test_drop_se > m.val_drop_se  # the test split sees the damage, and its drop's noise


def test_reports_carry_the_standard_errors_of_the_utilities(tmp_path):
    members, val, conf, test = overfit_family()
    data = DedupData(classification_score, public_val=val, public_test=test, public_confirm=conf)
    report = deduplicate_family(members, data, DedupConfig(block_size=128, threshold=0.02, interactive=False),
                                tmp_path / "s")
    for m in report.models:
        for before, se, n in ((m.val_utility_before, m.val_utility_se, 200), (m.test_utility_before, m.test_utility_se, 200)):
            assert se == pytest.approx(math.sqrt(before * (1 - before) * n / (n - 1) / n))
    assert report.targets[0].to_dict()["test_utility_se"] == report.targets[0].test_utility_se


def test_the_confirmation_margin_widens_the_allowed_drop_by_standard_errors():
    class Scores(nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = values

        def forward(self, batch):
            return self.values

    reference = Scores(torch.tensor([1.0, 0.0, 1.0, 1.0]))  # utility 3/4, SE 1/4 (above)
    worse = Scores(torch.tensor([1.0, 0.0, 0.0, 1.0]))  # utility 1/2: a drop of 1/4
    score = lambda model, batch: model(batch)  # noqa: E731
    plain = PublicValidator([None], score, reference=reference, threshold=0.1)
    wide = PublicValidator([None], score, reference=reference, threshold=0.1, margin_se=1.0)
    assert (plain.minimum, wide.minimum) == (pytest.approx(0.65), pytest.approx(0.4))
    assert not plain.accepts(worse) and wide.accepts(worse)


class _Scores(nn.Module):
    """A "model" whose per-example scores are fixed (batches are ignored)."""

    def __init__(self, *values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float64)

    def forward(self, batch):
        return self.values


def _given(model, batch):
    return model(batch)


def test_paired_utility_stats_are_the_mean_and_se_of_the_per_example_difference():
    a, b = _Scores(1, 0, 1, 1), _Scores(1, 1, 0, 1)
    own, diff = paired_utility_stats(a, [None], _given, example_scores(b, [None], _given))
    assert own == public_utility_stats(a, [None], _given)
    # differences 0, -1, 1, 0: mean 0, sample variance 2/3, SE √(2/3 / 4)
    assert (diff.mean, diff.n) == (0.0, 4) and diff.se == pytest.approx(math.sqrt(2 / 3 / 4))
    same = paired_utility_stats(a, [None], _given, example_scores(a, [None], _given))[1]
    assert (same.mean, same.se) == (0.0, 0.0)  # a model against itself: no noise at all
    with pytest.raises(ValueError, match="same batches"):
        paired_utility_stats(a, [None], _given, example_scores(_Scores(1, 0), [None], _given))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0])), min_size=2, max_size=40))
def test_the_paired_difference_is_the_difference_of_the_utilities(pairs):
    a, b = _Scores(*[x for x, _ in pairs]), _Scores(*[y for _, y in pairs])
    own, diff = paired_utility_stats(a, [None], _given, example_scores(b, [None], _given))
    assert diff.mean == pytest.approx(own.mean - public_utility_stats(b, [None], _given).mean, abs=1e-12)
    # pairing never costs precision against treating the two utilities as independent when they agree
    # on most examples: here the SE is that of the per-example difference
    d = torch.tensor([x - y for x, y in pairs], dtype=torch.float64)
    assert diff.se == pytest.approx(float(d.std(unbiased=True)) / math.sqrt(len(pairs)), abs=1e-12)


def test_the_paired_floor_lets_a_target_sit_within_noise_of_the_previous_model():
    """The defect it guards: with the exact floor, a target that the previous model beats by one
    example of 40 on validation (chance, on a set this small) may not change at all."""
    previous = [1.0] * 30 + [0.0] * 10  # 0.75
    target = [0.0] * 5 + [1.0] * 25 + [1.0] * 4 + [0.0] * 6  # 0.725: 5 examples lost, 4 gained
    edited = [0.0] * 6 + [1.0] * 24 + [1.0] * 4 + [0.0] * 6  # 0.70: the target after a replacement
    floor = public_utility_stats(_Scores(*previous), [None], _given).mean
    scores = example_scores(_Scores(*previous), [None], _given)

    def validator(reference, **floor_rule):
        return PublicValidator([None], _given, reference=_Scores(*reference), threshold=0.05, floor=floor, **floor_rule)

    exact = validator(target)
    assert not exact.accepts(_Scores(*target)) and not exact.accepts(_Scores(*edited))  # not even the unedited target
    paired = validator(target, floor_scores=scores, floor_margin_se=1.0)
    assert paired.accepts(_Scores(*target)) and paired.accepts(_Scores(*edited))
    # −0.05 against a paired SE of √((10 − 40 · 0.05²) / 39 / 40) ≈ 0.080
    assert paired.last_floor_difference.mean == pytest.approx(-0.05)
    assert paired.last_floor_difference.se == pytest.approx(math.sqrt((10 - 40 * 0.05 ** 2) / 39 / 40))
    # a target really below the previous model (8 of its 30 right answers lost, none gained) stays
    # refused even unedited: the floor still protects the order of the family
    clearly_worse = [0.0] * 8 + [1.0] * 22 + [0.0] * 10
    assert not validator(clearly_worse, floor_scores=scores, floor_margin_se=1.0).accepts(_Scores(*clearly_worse))
    same_as_exact = validator(target, floor_scores=scores, floor_margin_se=0.0)
    assert [same_as_exact.accepts(_Scores(*m)) for m in (target, edited, previous)] == [False, False, True]
    with pytest.raises(ValueError, match="floor too"):
        PublicValidator([None], _given, reference=_Scores(*target), threshold=0.05, floor_scores=scores)


@pytest.mark.parametrize("block", [BLOCK, 12, 5])  # 12, 5: blocks that start and end inside weight rows
@pytest.mark.parametrize("cost", ["delta", "wanda", "fisher", "taylor"])
def test_chunked_costs_equal_the_formulas_on_whole_tensors_bit_for_bit(cost, block):
    """BlockCosts reads factors a block at a time into reused buffers (the Wanda factor straight from
    the RMS vectors); the result must be the textbook formula on whole weight-shaped tensors."""
    base, target = MLP(0), MLP(1)
    live, base_matrix = LiveBlocks(target, block), LiveBlocks(base, block).matrix()
    deltas = base_matrix.double() - live.matrix().double()
    kw = dict(calibration=calibration(), loss_fn=mse_loss)
    prepared = BlockCosts.prepare(target, live.layout, measure=cost, **kw)
    blocks = list(range(live.n_blocks))
    chunks = [blocks[:5], blocks[5:6], blocks[6:]]  # uneven: buffers of one size serve smaller chunks
    got = torch.cat([prepared.costs(c, deltas[c]) for c in chunks])
    if cost == "delta":
        expected = deltas.square().sum(1)
    else:
        named = target.state_dict(keep_vars=True)
        if cost == "wanda":
            rms = input_rms(target, {s.name: named[s.name] for s in live.layout.tensors}, calibration(), mse_loss)
            full = {s.name: scale_by_input_rms(torch.ones(s.shape), rms.get(s.name)) for s in live.layout.tensors}
        else:
            mean, fisher = gradient_moments(target, live.layout, calibration(), loss_fn=mse_loss, micro_batch=1,
                                            max_examples=512)
            full = fisher
        factor = BlockRows.of(full, live.layout).matrix().double()
        if cost == "wanda":
            expected = (deltas * factor).square().sum(1)
        else:
            expected = 0.5 * (factor * deltas.square()).sum(1)
            if cost == "taylor":
                expected = (BlockRows.of(mean, live.layout).matrix().double() * deltas).sum(1) + expected
    assert torch.equal(got, expected)
    assert torch.equal(prepared.costs(blocks[:3], deltas[:3]), expected[:3])  # a reused buffer leaks nothing


def test_the_drop_bound_refuses_a_drop_within_the_threshold_only_by_luck():
    """An upper confidence bound on the drop: measured drop + z · paired SE must be within t."""
    reference = [1.0] * 30 + [0.0] * 10  # 0.75
    lucky = [0.0] * 6 + [1.0] * 24 + [1.0] * 5 + [0.0] * 5  # 0.725: 6 examples lost, 5 gained
    steady = [0.0] * 1 + [1.0] * 29 + [0.0] * 10  # 0.725: one example lost, nothing else changed
    plain = PublicValidator([None], _given, reference=_Scores(*reference), threshold=0.06)
    bound = PublicValidator([None], _given, reference=_Scores(*reference), threshold=0.06, drop_bound_se=1.0)
    assert plain.accepts(_Scores(*lucky)) and plain.accepts(_Scores(*steady))  # both drop 2.5 points
    # lucky: 11 changed examples, paired SE √((11 − 40 · 0.025²) / 39 / 40) ≈ 0.053: 0.025 + 0.053 > 0.06
    assert not bound.accepts(_Scores(*lucky))
    assert bound.last_difference.mean == pytest.approx(-0.025)
    assert bound.last_difference.se == pytest.approx(math.sqrt((11 - 40 * 0.025 ** 2) / 39 / 40))
    assert bound.accepts(_Scores(*steady))  # one changed example: SE 0.025, 0.025 + 0.025 ≤ 0.06
    assert bound.accepts(_Scores(*reference))  # no change at all
    with pytest.raises(ValueError, match="pass one"):
        PublicValidator([None], _given, reference=_Scores(*reference), threshold=0.06, drop_bound_se=1.0, margin_se=1.0)
