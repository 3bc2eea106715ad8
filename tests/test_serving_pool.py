"""ServingPool: bit-identical members, shared tensors, LRU under a budget, template reuse, bad input."""

from __future__ import annotations

import pytest
import torch

from hf_dpdedup.errors import ServingBudgetError, ServingTimeoutError, UnknownMemberError
from hf_dpdedup.serving import ServingPool
from hf_dpdedup.store.family import FamilyStore

from conftest import tiny_model
from serving_support import BLOCK, build_family, inputs_for, reference_logits


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("serving"))


def weight(model, name):
    return model.get_parameter(name)


def test_every_member_is_bit_identical_to_from_pretrained(family):
    fam, originals = family
    pool = ServingPool(fam.root)
    x = inputs_for()
    for name in fam.members():
        out = pool.infer(name, **x).logits
        assert torch.equal(out, reference_logits(fam, name, x)), name
        with torch.inference_mode():
            assert torch.equal(out, originals[name](**x).logits), name


def test_identical_tensors_share_storage_and_only_differences_are_materialized(family):
    fam, _ = family
    pool = ServingPool(fam.root)
    words = "bert.embeddings.word_embeddings.weight"
    query0 = "bert.encoder.layer.0.attention.self.query.weight"
    top_query = "bert.encoder.layer.1.attention.self.query.weight"
    with pool.use("base") as base, pool.use("top1") as top1, pool.use("part1") as p1, pool.use("part2") as p2:
        # taken whole from the base: the very same tensor, a view of the block memory
        assert weight(top1, words) is weight(base, words)
        assert weight(p1, words).data_ptr() == weight(base, words).data_ptr()
        # changed in top1: its own memory
        assert weight(top1, top_query).data_ptr() != weight(base, top_query).data_ptr()
        # part1/part2: same mixed rows -> one gathered tensor, shared by both
        assert weight(p1, query0) is weight(p2, query0)
        assert weight(p1, query0).data_ptr() != weight(base, query0).data_ptr()
        assert not torch.equal(weight(p1, query0), weight(base, query0))
        assert weight(p1, "classifier.weight").data_ptr() != weight(p2, "classifier.weight").data_ptr()
        # small tensors are packed into rows: an unchanged one is the base's very tensor, a view
        norm = "bert.embeddings.LayerNorm.weight"
        assert weight(top1, norm) is weight(base, norm) and weight(p1, norm) is weight(base, norm)
        assert not torch.equal(weight(top1, "classifier.weight"), weight(base, "classifier.weight"))
    memory = pool.memory()
    # 4 members cost one gather (4 rows of 256 float32); their small tensors are views of the rows
    assert memory["materialized_bytes"] == 4 * 256 * 4


def test_lru_eviction_order_and_template_reuse(family):
    fam, _ = family
    pool = ServingPool(fam.root, max_models=2)
    x = inputs_for()
    for name in ("base", "top1", "top2"):
        pool.infer(name, **x)
    assert pool.resident() == ["top1", "top2"]  # base was least recently used
    pool.infer("top1", **x)  # a hit refreshes top1
    pool.infer("part1", **x)
    assert pool.resident() == ["top1", "part1"]  # top2 evicted, not top1
    stats = pool.stats()
    assert stats["evictions"] == 2 and stats["hits"] == 1
    # one model built; top1 cloned from resident base; top2 and part1 took evicted module trees
    assert (stats["built_model"], stats["cloned_template"], stats["reused_template"]) == (1, 1, 2)
    # a re-pointed template answers like its member, and another architecture gets its own module
    for name in ("base", "mlm", "top2", "part2"):
        assert torch.equal(pool.infer(name, **x).logits, reference_logits(fam, name, x)), name
    assert pool.stats()["built_model"] == 2


def test_resident_template_clone_is_independent(family):
    fam, _ = family
    pool = ServingPool(fam.root)
    x = inputs_for()
    with pool.use("base") as base, pool.use("top1") as top1:
        assert pool.stats()["cloned_template"] == 1
        assert top1 is not base and all(a is not b for a, b in zip(top1.modules(), base.modules()))
        name = "bert.encoder.layer.1.output.dense.weight"
        assert weight(top1, name) is not weight(base, name)
    for member in ("base", "top1"):  # neither saw the other's weights
        assert torch.equal(pool.infer(member, **x).logits, reference_logits(fam, member, x))


def test_evicted_members_tensors_stay_idle_until_room_is_needed(family):
    fam, _ = family
    query0 = "bert.encoder.layer.0.attention.self.query.weight"
    pool = ServingPool(fam.root, max_models=1)
    with pool.use("part1") as model:
        gathered = weight(model, query0).data_ptr()
    pool.infer("base", **inputs_for())  # evicts part1; its gathered tensor stays (room to spare)
    with pool.use("part1") as model:
        assert weight(model, query0).data_ptr() == gathered  # no copy on the way back


def test_byte_budget_is_respected(tmp_path):
    """Members whose own tensors are gathers (each a different partial change of the base): the
    smallest budget the pool accepts holds the blocks and one member's gather, so serving them in
    turn evicts, and memory never exceeds the budget."""
    family = FamilyStore.create(tmp_path / "family", block_size=BLOCK)
    family.add_model("base", tiny_model("bert", seed=0))
    for i, layer in enumerate((0, 1)):
        model = tiny_model("bert", seed=0)
        with torch.no_grad():  # the first block of a query weight: the tensor's rows are no longer one run
            model.bert.encoder.layer[layer].attention.self.query.weight.view(-1)[:BLOCK].add_(0.1 + i)
        family.add_model(f"part{i}", model)
    blocks = ServingPool(family.root).memory()["block_bytes"]
    budget = blocks
    while True:  # the smallest budget it accepts
        try:
            pool = ServingPool(family.root, budget_bytes=budget)
            break
        except ServingBudgetError:
            budget += 256
    assert budget < blocks + 2 * 32 * 32 * 4  # not room for both gathers
    x = inputs_for()
    for name in ["part0", "part1"] * 3:
        pool.infer(name, **x)
        memory = pool.memory()
        assert memory["used_bytes"] <= memory["budget_bytes"]
    assert pool.memory()["peak_bytes"] <= budget
    assert pool.stats()["evictions"] > 0


def test_budget_in_models(family):
    fam, _ = family
    pool = ServingPool(fam.root, budget_models=4)  # tiny models: the blocks of 6 members need > 2
    assert pool.budget_bytes == 4 * pool.full_model_bytes
    assert pool.full_model_bytes == max(pool.plan(n).full_bytes for n in pool.members)


def test_bad_input_raises_typed_errors(family):
    fam, _ = family
    with pytest.raises(UnknownMemberError, match="nope"):
        ServingPool(fam.root, members=["base", "nope"])
    pool = ServingPool(fam.root, members=["base", "top1"])
    with pytest.raises(UnknownMemberError, match="top2"):
        pool.infer("top2", **inputs_for())
    with pytest.raises(UnknownMemberError):
        pool.infer(None, **inputs_for())  # type: ignore[arg-type]
    with pytest.raises(ServingBudgetError, match="at least"):
        ServingPool(fam.root, budget_bytes=1000)
    with pytest.raises(ServingBudgetError):
        ServingPool(fam.root, budget_bytes=10**9, budget_models=2)


def test_waits_for_a_busy_member_then_times_out(family):
    fam, _ = family
    pool = ServingPool(fam.root, max_models=1, wait_timeout=0.2)
    with pool.use("base"):
        with pytest.raises(ServingTimeoutError):
            pool.infer("top1", **inputs_for())
        assert pool.resident() == ["base"]
    pool.infer("top1", **inputs_for())  # free once base is released
    assert pool.resident() == ["top1"]
