"""Bad input: each case raises a typed hf_dpdedup error that says what to do; nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch

from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.errors import (
    BlockLayoutError,
    ChecksumMismatchError,
    ConstitutionError,
    DtypeMismatchError,
    HfDpDedupError,
    StoreFormatError,
    StoreMismatchError,
    UnsupportedFormatVersionError,
)
from hf_dpdedup.store import BlockStore
from hf_dpdedup.store import block_store as block_store_module
from hf_dpdedup.store.io import forget_verified

from block_support import plain_rows
from conftest import example_inputs, tiny_model


@pytest.fixture
def family(tmp_path):
    fam = FamilyStore.create(tmp_path / "fam", block_size=128)
    fam.add_model("m", tiny_model("bert"))
    forget_verified()
    return fam


def load(family, name="m"):
    return DedupedModel.from_pretrained(family.member_path(name))


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_shard(family):
    return family.blocks.path / family.blocks.index.shards[0].file


def test_truncated_shard_is_detected(family):
    shard = first_shard(family)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ChecksumMismatchError, match="download it again"):
        load(family)


def test_bit_flipped_shard_is_detected(family):
    shard = first_shard(family)
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="corrupted"):
        load(family)


def test_bit_flipped_extras_are_detected(family):
    extras = family.member_path("m") / "extras.safetensors"
    data = bytearray(extras.read_bytes())
    data[-3] ^= 0x01
    extras.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        load(family)


def test_constitution_naming_a_missing_row(family):
    total = family.blocks.index.total_rows
    edit_json(family.member_path("m") / "dedup_constitution.json",
              lambda d: d["tensors"][0].__setitem__("rows", [total + 5, *plain_rows(d)[1:]]))
    with pytest.raises(ConstitutionError, match=f"names block row {total + 5}"):
        load(family)


def test_tensor_whose_blocks_do_not_cover_its_shape(family):
    edit_json(family.member_path("m") / "dedup_constitution.json",
              lambda d: d["tensors"][0].__setitem__("rows", plain_rows(d)[:-1]))
    with pytest.raises(ConstitutionError, match="do not cover its shape"):
        load(family)


@pytest.mark.parametrize("target", ["store", "member"])
def test_unknown_format_version(family, target):
    path = (family.blocks.path / "block_store.json") if target == "store" else (
        family.member_path("m") / "dedup_constitution.json")
    edit_json(path, lambda d: d.__setitem__("format", "hf_dpdedup/99"))
    with pytest.raises(UnsupportedFormatVersionError, match="Upgrade hf_dpdedup"):
        load(family)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4096", None])
def test_block_size_not_a_positive_integer(tmp_path, family, bad):
    with pytest.raises(BlockLayoutError, match="positive integer"):
        FamilyStore.create(tmp_path / "other", block_size=bad)
    edit_json(family.blocks.path / "block_store.json", lambda d: d.__setitem__("block_size", bad))
    with pytest.raises(StoreFormatError, match="positive integer"):
        load(family)


def test_member_pointing_at_the_wrong_store(tmp_path, family):
    other = FamilyStore.create(tmp_path / "other", block_size=128)
    other.add_model("x", tiny_model("bert", seed=3))
    with pytest.raises(StoreMismatchError, match="belongs to block store"):
        DedupedModel.from_pretrained(family.member_path("m"), store_dir=other.blocks.path)


def test_missing_shard_file(family):
    first_shard(family).unlink()
    with pytest.raises(StoreFormatError, match="missing"):
        load(family)


def test_not_a_member_folder(tmp_path):
    with pytest.raises(StoreFormatError, match="member folder"):
        DedupedModel.from_pretrained(tmp_path)
    with pytest.raises(StoreFormatError, match="No member folder"):
        DedupedModel.from_pretrained(tmp_path / "nope")


def test_damaged_index_json(family):
    (family.blocks.path / "block_store.json").write_text("{not json")
    with pytest.raises(StoreFormatError, match="not valid JSON"):
        load(family)


def test_index_whose_shards_do_not_tile_the_rows(family):
    edit_json(family.blocks.path / "block_store.json", lambda d: d["shards"][-1].__setitem__("num_rows", 1 + d["shards"][-1]["num_rows"]))
    with pytest.raises(StoreFormatError, match="damaged"):
        load(family)


def test_mixing_dtypes_in_one_family(family):
    with pytest.raises(DtypeMismatchError, match="one block dtype"):
        family.add_model("half", tiny_model("bert").to(torch.bfloat16))
    assert family.members() == ["m"]


def test_bad_member_name(family):
    with pytest.raises(StoreFormatError, match="not allowed"):
        family.add_model("../escape", tiny_model("bert"))


def test_creating_over_an_existing_store(tmp_path, family):
    with pytest.raises(StoreFormatError, match="already exists"):
        FamilyStore.create(family.root, block_size=128)


def test_every_error_is_typed(family):
    assert issubclass(ChecksumMismatchError, HfDpDedupError)
    assert issubclass(StoreMismatchError, StoreFormatError)


# --- crash safety ------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def test_crash_while_writing_a_shard_leaves_the_previous_store_readable(family, monkeypatch):
    before = (family.blocks.path / "block_store.json").read_bytes()
    real_save = block_store_module.save_shard

    def half_then_crash(path, rows, metadata):
        real_save(path, rows, metadata)
        with open(path, "r+b") as fh:
            fh.truncate(50)
        raise Boom("disk full")

    monkeypatch.setattr(block_store_module, "save_shard", half_then_crash)
    with pytest.raises(Boom):
        family.add_model("new", tiny_model("bert", seed=9))
    monkeypatch.undo()
    assert (family.blocks.path / "block_store.json").read_bytes() == before
    assert not [p for p in family.blocks.path.iterdir() if p.name.endswith(".tmp")]
    assert family.members() == ["m"]
    original = tiny_model("bert")
    loaded = load(family)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
    family.add_model("new", tiny_model("bert", seed=9))  # and the store still takes new models
    assert family.members() == ["m", "new"]


def test_crash_while_writing_a_member_keeps_the_old_member(family, monkeypatch):
    from hf_dpdedup.store import member as member_module

    def crash(*args, **kwargs):
        raise Boom("killed")

    monkeypatch.setattr(member_module, "save_file", crash)
    with pytest.raises(Boom):
        family.add_model("m", tiny_model("bert", seed=5))  # would replace m
    monkeypatch.undo()
    assert family.members() == ["m"]
    assert [p.name for p in (family.root / "members").iterdir() if p.name != ".lock"] == ["m"]
    loaded = load(family)
    original = tiny_model("bert")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))


def test_identical_tensors_do_not_alias_after_loading(tmp_path):
    model = tiny_model("gpt2")  # both layers' c_fc biases start as identical zero rows
    fam = FamilyStore.create(tmp_path / "fam", block_size=128)
    fam.add_model("m", model)
    loaded = DedupedModel.from_pretrained(fam.member_path("m"))
    a, b = loaded.transformer.h[0].mlp.c_fc.bias, loaded.transformer.h[1].mlp.c_fc.bias
    assert torch.equal(a, b)
    with torch.no_grad():
        a.add_(1.0)
    assert not torch.equal(a, b)
    with torch.no_grad():
        out = loaded(**example_inputs("gpt2")).logits
    assert torch.isfinite(out).all()


def test_blockstore_rejects_wrong_matrix_shape(family):
    with pytest.raises(StoreFormatError, match=r"\[n, 128\]"):
        family.blocks.add_rows(torch.zeros(3, 64))
    reopened = BlockStore.open(family.blocks.path)
    assert reopened.index == family.blocks.index
