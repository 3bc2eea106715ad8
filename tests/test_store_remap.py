"""Scattered members' tensors mapped from the shard files (store/remap.py) instead of copied."""

from __future__ import annotations

import os
import struct
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.errors import ChecksumMismatchError
from hf_dpdedup.store import remap
from hf_dpdedup.store.block_store import ALIGNMENT, PAGE_ALIGNMENT
from hf_dpdedup.store.io import forget_verified, sha256_file
from hf_dpdedup.store.member import load_member_state_dict, read_constitution
from hf_dpdedup.store.remap import RowMapper, mappable

from conftest import example_inputs, tiny_model

pytestmark = pytest.mark.skipif(not remap.available() or not sys.platform.startswith("linux"),
                                reason="maps file pages with MAP_FIXED; checked through /proc/self/maps")
BLOCK = 1024  # fp32: 4 KiB rows, whole pages


def half_changed(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """The model's state dict with every other block of each tensor changed: a member that shares
    half its rows with ``model``, so its tensors alternate between two shards."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        flat = t.view(-1)
        for start in range(BLOCK, flat.numel(), 2 * BLOCK):
            chunk = flat[start : start + BLOCK]
            chunk.add_(0.01 * torch.randn(chunk.shape, generator=g))
        out[name] = t
    return out


def shard_paths(family: FamilyStore) -> list[str]:
    return [str((family.blocks.path / s.file).resolve()) for s in family.blocks.index.shards]


def mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files mapped in this process at the tensor's address range."""
    begin = tensor.untyped_storage().data_ptr()
    end = begin + tensor.untyped_storage().nbytes()
    found = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in parts[0].split("-"))
            if low < end and high > begin and len(parts) == 6:
                found.add(parts[5].strip())
    return found


@pytest.fixture()
def family(tmp_path):
    model = tiny_model("bert")
    family = FamilyStore.create(tmp_path / "fam", block_size=BLOCK)
    family.add_model("base", model)
    family.add_model("mixed", half_changed(model), files_from=family.member_path("base"))
    return family, model


def test_shards_with_whole_page_rows_start_their_data_on_a_page(family, tmp_path):
    fam, model = family
    for shard in fam.blocks.index.shards:
        raw = (fam.blocks.path / shard.file).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert (8 + length) % PAGE_ALIGNMENT == 0
    small = FamilyStore.create(tmp_path / "small", block_size=128)  # 512-byte rows: 64-byte alignment
    small.add_model("m", model)
    raw = (small.blocks.path / small.blocks.index.shards[0].file).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % ALIGNMENT == 0 and 8 + length < PAGE_ALIGNMENT  # no page of padding


def test_scattered_member_is_mapped_from_both_shards_bit_identical(family):
    fam, model = family
    expected = half_changed(model)
    loaded = DedupedModel.from_pretrained(fam.member_path("mixed"))
    weight = loaded.bert.encoder.layer[0].intermediate.dense.weight
    assert mapped_files(weight) == set(shard_paths(fam))  # its rows come from the base's shard and its own
    state = loaded.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    reference = type(model)(model.config).eval()
    reference.load_state_dict(expected)
    inputs = example_inputs("bert")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, reference(**inputs).logits)


def test_writes_to_a_mapped_tensor_change_neither_the_files_nor_another_member(family):
    fam, _ = family
    digests = [sha256_file(p) for p in shard_paths(fam)]
    first = DedupedModel.from_pretrained(fam.member_path("mixed"))
    second = DedupedModel.from_pretrained(fam.member_path("mixed"))
    base = DedupedModel.from_pretrained(fam.member_path("base"))
    w1 = first.bert.encoder.layer[0].intermediate.dense.weight
    before = second.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    base_before = base.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    with torch.no_grad():
        w1.add_(1.0)  # copy-on-write: private pages for this tensor only
    assert torch.equal(second.bert.encoder.layer[0].intermediate.dense.weight, before)
    assert torch.equal(base.bert.encoder.layer[0].intermediate.dense.weight, base_before)
    assert [sha256_file(p) for p in shard_paths(fam)] == digests
    forget_verified()
    again = DedupedModel.from_pretrained(fam.member_path("mixed"))  # files still verify
    assert torch.equal(again.bert.encoder.layer[0].intermediate.dense.weight, before)


def test_mapping_is_released_with_the_tensor(family):
    fam, _ = family
    constitution = read_constitution(fam.member_path("mixed"))
    state = load_member_state_dict(fam.member_path("mixed"), constitution, fam.blocks)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    begin = state[name].untyped_storage().data_ptr()
    assert mapped_files(state[name])
    del state
    with open("/proc/self/maps") as fh:
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in fh]
    assert not any(low <= begin < high for low, high in ranges)


def test_a_corrupted_shard_is_caught_before_any_row_is_mapped(family):
    fam, _ = family
    path = fam.blocks.path / fam.blocks.index.shards[-1].file
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    forget_verified()
    with pytest.raises(ChecksumMismatchError):
        DedupedModel.from_pretrained(fam.member_path("mixed"))


def test_a_shard_replaced_after_it_was_checked_is_not_mapped(family):
    fam, _ = family
    store = fam.blocks
    shards = list(store.index.shards)
    store.read_shards(shards)  # checks (and remembers) the current files
    with store.row_files(shards) as files:
        assert set(files) == {s.first_row for s in shards}
    path = store.path / shards[0].file
    copy = path.with_suffix(".tmp")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # same bytes, another file: not the version this process checked
    with store.row_files(shards) as files:
        assert shards[0].first_row not in files
    with store.row_files(shards, verify=False) as files:
        assert shards[0].first_row in files


def test_switched_off_scattered_rows_are_copied(family, monkeypatch):
    fam, _ = family
    monkeypatch.setenv(remap.SWITCH, "0")
    loaded = DedupedModel.from_pretrained(fam.member_path("mixed"))
    weight = loaded.bert.encoder.layer[0].intermediate.dense.weight
    assert not (mapped_files(weight) & set(shard_paths(fam)))
    monkeypatch.delenv(remap.SWITCH)
    mapped = DedupedModel.from_pretrained(fam.member_path("mixed")).bert.encoder.layer[0].intermediate.dense.weight
    assert mapped_files(mapped) == set(shard_paths(fam)) and torch.equal(mapped, weight)


def test_without_a_mapping_budget_rows_are_copied_the_same(family):
    fam, model = family
    store = fam.blocks
    shards = list(store.index.shards)
    matrices = store.read_shards(shards)
    with store.row_files(shards) as files:
        runs = [(shards[0].first_row, 0, 1), (shards[-1].first_row, 0, 1), (shards[0].first_row, 2, 2)]
        mapper = RowMapper(files, store.block_size, store.dtype)
        mapped = mapper.gather(runs, 4)
        expected = torch.cat([matrices[k][i : i + n] for k, i, n in runs])
        assert mapped is not None and torch.equal(mapped, expected)
        mapper.budget = len(runs)  # one mapping short (the reservation counts too)
        assert mapper.gather(runs, 4) is None
        assert RowMapper({}, store.block_size, store.dtype).gather(runs, 4) is None


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 1 << 20), st.integers(1, 64))
def test_only_whole_aligned_pages_are_mappable(offset, pages):
    row_bytes = pages * remap.PAGE
    assert mappable(offset, row_bytes) == (offset % remap.PAGE == 0)
    assert not mappable(offset, row_bytes + ALIGNMENT)
