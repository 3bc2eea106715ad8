"""Search strategies on a planted oracle, and exact revert of in-place edits."""

from __future__ import annotations

import pytest
import torch

from hf_dpdedup.dedup.live import LiveBlocks, Replacement
from hf_dpdedup.dedup.search import run_search

from conftest import tiny_model

BLOCK = 64


class PlantedOracle:
    """Accepts a model iff none of the 'bad' blocks is changed from its original values."""

    def __init__(self, live: LiveBlocks, bad: set[int], halt_after: int | None = None):
        self.live, self.bad = live, bad
        self.original = {b: live.read(b) for b in bad}
        self.validations = 0
        self.rejections = 0
        self.halt_after = halt_after

    @property
    def halted(self) -> bool:
        return self.halt_after is not None and self.rejections >= self.halt_after

    def accepts(self, model) -> bool:
        self.validations += 1
        ok = all(torch.equal(self.live.read(b), v) for b, v in self.original.items())
        self.rejections += not ok
        return ok


def setup(bad: set[int], halt_after=None):
    model = tiny_model("bert")
    live = LiveBlocks(model, BLOCK)
    assert live.n_blocks == 352
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sequence = [Replacement(i, "base", i, torch.full((BLOCK,), float(i))) for i in range(live.n_blocks)]
    return model, live, original, sequence, PlantedOracle(live, bad, halt_after)


def changed_blocks(live: LiveBlocks, sequence) -> set[int]:
    return {r.block for r in sequence if torch.equal(live.read(r.block)[: 1], r.row[:1])}


@pytest.mark.parametrize("strategy,options", [
    ("gallop", {"min_group": 2}), ("greedy", {"n": 10}), ("greedy", {"n": 1}), ("binary", {"min_group": 2}),
    ("halving", {"min_group": 2}), ("mcts", {"group": 20, "episodes": 20}),
])
def test_strategies_never_keep_a_bad_block_and_agree_with_the_model(strategy, options):
    bad = {40, 41, 120, 121, 122, 300}
    model, live, _, sequence, oracle = setup(bad)
    result = run_search(strategy, model, live, sequence, oracle, **options)
    kept = {r.block for r in result.accepted}
    assert not kept & bad
    assert result.validations == oracle.validations
    assert changed_blocks(live, sequence) == kept  # what is reported is what is applied
    assert oracle.accepts(model)  # the final model passes


def test_greedy_validation_count_and_result_on_planted_oracle():
    bad = {5, 25}
    model, live, _, sequence, oracle = setup(bad)
    n = live.n_blocks
    result = run_search("greedy", model, live, sequence, oracle, n=10)
    assert result.validations == -(-n // 10)
    assert {r.block for r in result.accepted} == set(range(n)) - set(range(0, 10)) - set(range(20, 30))


def test_binary_and_halving_use_few_validations_and_find_the_clean_prefix():
    n_bad_from = 300  # every block from 300 on is salient (bad): the clean prefix is 0..299
    model, live, _, sequence, oracle = setup(set())
    oracle.bad = set(range(n_bad_from, live.n_blocks))
    oracle.original = {b: live.read(b) for b in oracle.bad}
    for strategy in ("gallop", "binary", "halving"):
        model, live, _, sequence, _ = setup(set())
        oracle = PlantedOracle(live, set(range(n_bad_from, live.n_blocks)))
        result = run_search(strategy, model, live, sequence, oracle, min_group=4)
        kept = {r.block for r in result.accepted}
        assert result.validations <= 30, (strategy, result.validations)
        assert len(kept) >= n_bad_from - 8, (strategy, len(kept))
        assert not kept & oracle.bad


def test_rejected_groups_are_reverted_bit_exactly():
    model, live, original, sequence, oracle = setup(set(range(0, 352)))  # every block is bad
    result = run_search("binary", model, live, sequence, oracle, min_group=1)
    assert result.accepted == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_search_stops_when_the_validator_halts():
    model, live, _, sequence, oracle = setup(set(range(0, 352)), halt_after=3)
    result = run_search("greedy", model, live, sequence, oracle, n=5)
    assert result.halted and oracle.rejections == 3 and result.validations == 3


def test_unknown_strategy():
    model, live, _, sequence, oracle = setup(set())
    with pytest.raises(ValueError, match="binary"):
        run_search("random", model, live, sequence, oracle)


def test_live_blocks_see_tied_weights_once_and_edit_in_place():
    model = tiny_model("gpt2")
    live = LiveBlocks(model, BLOCK)
    assert "lm_head.weight" in live.layout.aliases
    undo = live.apply([Replacement(0, "base", 0, torch.zeros(BLOCK))])
    assert torch.count_nonzero(model.lm_head.weight.view(-1)[:BLOCK]) == 0  # tied: same storage
    live.revert(undo)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("strategy,options", [("binary", {"min_group": 2}), ("mcts", {"group": 20, "episodes": 5})])
def test_progress_advances_once_per_validation(strategy, options):
    model, live, _, sequence, oracle = setup({40, 300})
    ticks = []
    result = run_search(strategy, model, live, sequence, oracle, progress=ticks.append, **options)
    assert sum(ticks) == oracle.validations and len(ticks) >= 1
    assert result.validations >= sum(ticks)


class AlwaysAccepts:
    validations = 0
    halted = False

    def accepts(self, model) -> bool:
        return True


@pytest.mark.parametrize("mode", ["prefix", "gallop"])
def test_confirmation_reverts_what_the_second_split_rejects(mode):
    from hf_dpdedup.dedup.search import confirm

    model, live, original, sequence, oracle = setup({5})  # the confirmation split rejects block 5
    result = run_search("greedy", model, live, sequence, AlwaysAccepts(), n=len(sequence))
    assert len(result.accepted) == live.n_blocks  # the search's own split accepted everything
    confirm(model, live, result, oracle, mode=mode, max_validations=12)
    kept = {r.block for r in result.accepted}
    assert 5 not in kept and oracle.accepts(model)
    assert changed_blocks(live, sequence) == kept  # what is reported is what is applied
    assert result.rejected_by_confirmation == live.n_blocks - len(kept)
    if mode == "prefix":
        assert kept == set(range(5))  # the longest passing prefix
    else:
        assert set(range(5)) < kept and len(kept) > 10  # walks past the rejected block
    assert result.confirmations == oracle.validations - 1  # (the oracle was asked once more above)


@pytest.mark.parametrize("strategy,options", [("gallop", {"min_group": 2}), ("mcts", {"group": 20, "episodes": 10})])
def test_without_undo_the_search_keeps_the_same_blocks_and_no_old_values(strategy, options):
    from hf_dpdedup.dedup.search import confirm

    bad = {40, 41, 120}
    model, live, _, sequence, oracle = setup(bad)
    kept_with = {r.block for r in run_search(strategy, model, live, sequence, oracle, **options).accepted}
    state_with = {k: v.clone() for k, v in model.state_dict().items()}
    model, live, _, sequence, oracle = setup(bad)
    result = run_search(strategy, model, live, sequence, oracle, keep_undo=False, **options)
    assert {r.block for r in result.accepted} == kept_with and result.undo == []
    assert all(torch.equal(v, state_with[k]) for k, v in model.state_dict().items())  # the same edits
    with pytest.raises(ValueError, match="keep_undo=True"):
        confirm(model, live, result, oracle)
