"""Compact members (format 3): runs of consecutive row ids written as ``[first, count]``, and small
extras packed into block rows shared between members."""

import copy
import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup import DedupedModel
from hf_dpdedup.blocks import PACKED_EXTRAS, pack_extras, plan_layout, unpack_extras
from hf_dpdedup.errors import BlockLayoutError, ConstitutionError, UnsupportedFormatVersionError
from hf_dpdedup.hub.remote import REMOTE_CODE
from hf_dpdedup.store.family import FamilyStore
from hf_dpdedup.store.constitution import MIN_RUN, Constitution, decode_rows, encode_rows
from hf_dpdedup.store.format import CONSTITUTION_FILE
from hf_dpdedup.store.summary import member_summary

from block_support import with_own_small_tensors
from conftest import tiny_model

ROWS = st.lists(st.integers(0, 60), max_size=40)


def remote_row_ids():
    spec = importlib.util.spec_from_file_location("modeling_hf_dpdedup_row_runs_test", REMOTE_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.row_ids


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_runs_round_trip_and_only_shorten(rows):
    encoded = encode_rows(rows)
    assert decode_rows(json.loads(json.dumps(encoded)), "t") == tuple(rows)
    assert len(json.dumps(encoded)) <= len(json.dumps(rows))
    for item in encoded:  # a run is at least MIN_RUN long and really consecutive; no two runs could merge
        if isinstance(item, list):
            assert item[1] >= MIN_RUN
    # no run left as plain ids: MIN_RUN consecutive plain ids never follow each other
    plain = [x for x in encoded]
    for i in range(len(plain) - MIN_RUN + 1):
        window = plain[i:i + MIN_RUN]
        if all(isinstance(x, int) for x in window):
            assert any(b != a + 1 for a, b in zip(window, window[1:]))


@settings(max_examples=200, deadline=None)
@given(ROWS)
def test_the_remote_code_reads_runs_as_the_library_does(rows):
    assert remote_row_ids()(encode_rows(rows)) == list(rows)


def test_runs_are_written_as_pairs():
    assert encode_rows([0, 1, 2, 3, 9, 4, 5, 7, 8, 9]) == [[0, 4], 9, 4, 5, [7, 3]]
    assert encode_rows([]) == [] and encode_rows([5]) == [5] and encode_rows([3, 4]) == [3, 4]


@pytest.mark.parametrize("bad", [[[0]], [[0, 0]], [[-1, 2]], [[0, 2, 1]], [[0, True]], [1.5], ["3"], [-2]])
def test_bad_runs_are_typed_errors(bad):
    with pytest.raises(ConstitutionError, match="row ids must be integers"):
        decode_rows(bad, "t")


@pytest.fixture()
def member(tmp_path):
    family = FamilyStore.create(tmp_path / "fam", block_size=64)
    family.add_model("m", tiny_model("bert"))
    return family, family.member_path("m")


def test_a_member_with_runs_is_format_3_and_loads_bit_exactly(member):
    family, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    assert data["format"] == "hf_dpdedup/3" and data["adapter"] is None
    assert any(isinstance(item, list) for t in data["tensors"] for item in t["rows"])
    written = sum(len(json.dumps(t["rows"])) for t in data["tensors"])
    plain = sum(len(json.dumps(decode_rows(t["rows"], t["name"]))) for t in data["tensors"])
    assert written * 5 < plain  # fresh rows: a few pairs instead of one id per block
    summary = member_summary(folder, Constitution.from_dict(data))
    layout = plan_layout(tiny_model("bert").state_dict(), 64)
    assert (summary["block_tensors"], summary["extras"], summary["packed_extras"]) == (
        len(layout.tensors), len(layout.extras), len(data["packed_extras"]))
    original = tiny_model("bert").state_dict()
    loaded = DedupedModel.from_pretrained(folder).state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], v) for k, v in original.items())


def test_runs_need_format_3_and_format_3_names_its_adapter_record(member):
    _, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    with pytest.raises(ConstitutionError, match="older format"):
        Constitution.from_dict({**data, "format": "hf_dpdedup/1"})
    with pytest.raises(ConstitutionError, match="adapter"):
        Constitution.from_dict({k: v for k, v in data.items() if k != "adapter"})
    with pytest.raises(UnsupportedFormatVersionError, match="Upgrade hf_dpdedup"):
        Constitution.from_dict({**data, "format": "hf_dpdedup/4"})


def test_a_member_without_runs_or_packed_extras_keeps_format_1(member):
    _, folder = member
    stored = Constitution.from_dict(json.loads((folder / CONSTITUTION_FILE).read_text()))
    assert stored.packed  # the tiny BERT's biases and norms are packed into rows
    scattered = tuple(replace(t, rows=tuple(reversed(t.rows))) for t in stored.tensors if t.name != PACKED_EXTRAS)
    out = replace(stored, tensors=scattered, packed=(), extras=stored.extras + tuple(p.name for p in stored.packed)).to_dict()
    assert out["format"] == "hf_dpdedup/1" and "adapter" not in out and "packed_extras" not in out
    assert Constitution.from_dict(json.loads(json.dumps(out))).tensors == scattered


def test_packed_extras_must_tile_their_rows(member):
    _, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    packed = data["packed_extras"]
    for edit, match in [
        (lambda d: d["packed_extras"][1].__setitem__("offset", packed[1]["offset"] + 1), "must follow each other"),
        (lambda d: d["packed_extras"].pop(), "cover"),
        (lambda d: d.pop("packed_extras"), "missing"),
        (lambda d: d["packed_extras"][0].__setitem__("shape", "32"), "shape"),
        (lambda d: d["packed_extras"].append(dict(packed[0], offset=10 ** 6)), "follow each other"),
        (lambda d: d["packed_extras"][2].__setitem__("name", packed[1]["name"]), "twice"),
    ]:
        broken = json.loads(json.dumps(data))
        edit(broken)
        with pytest.raises(ConstitutionError, match=match):
            Constitution.from_dict(broken)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([(3,), (5, 2), (0,), (1,), (7,)]), min_size=0, max_size=8), st.sampled_from([4, 8, 64]))
def test_pack_then_unpack_gives_every_extra_back_bit_exactly(shapes, block_size):
    torch.manual_seed(len(shapes))
    state = {"big": torch.randn(2 * block_size)}
    state.update({f"small{i}": torch.randn(shape) for i, shape in enumerate(shapes) if 0 < (math.prod(shape)) < block_size})
    state["steps"] = torch.tensor([3])  # not floating: stays a file extra
    state["half"] = torch.ones(2, dtype=torch.float16)  # another dtype: stays a file extra
    layout = plan_layout(state, block_size)
    packed_layout, with_packed, packed = pack_extras(state, layout)
    assert set(packed_layout.extras) == {"steps", "half"}
    assert [p.name for p in packed] == [n for n in layout.extras if n.startswith("small")]
    if packed:
        flat = with_packed[PACKED_EXTRAS]
        assert packed_layout.tensors[-1].name == PACKED_EXTRAS and flat.numel() == sum(p.numel for p in packed)
        back = unpack_extras(flat, packed)
        assert all(torch.equal(back[p.name], state[p.name]) for p in packed)
        assert all(back[p.name].data_ptr() != flat.data_ptr() for p in packed)  # own memory
    else:
        assert packed_layout == layout


def test_a_reserved_name_in_the_state_dict_is_refused():
    with pytest.raises(BlockLayoutError, match="reserved"):
        pack_extras({PACKED_EXTRAS: torch.zeros(3)}, plan_layout({PACKED_EXTRAS: torch.zeros(3)}, 8))


def test_members_with_equal_small_tensors_store_them_once(tmp_path):
    """The adapter-member case: every member repeats the base's biases and norms. Packed into rows,
    the second member's copies are the first one's rows (before, each member wrote its own file)."""
    family = FamilyStore.create(tmp_path / "fam", block_size=64)
    first = with_own_small_tensors(tiny_model("bert", seed=0), seed=3)  # genuinely shared values
    family.add_model("first", first)
    second = copy.deepcopy(first)
    with torch.no_grad():
        second.bert.encoder.layer[0].intermediate.dense.weight.add_(1.0)  # a big tensor differs
    rows_before = family.blocks.index.total_rows
    family.add_model("second", second)
    packed = next(t for t in family.constitution("second").tensors if t.name == PACKED_EXTRAS)
    assert set(packed.rows) <= set(range(rows_before))  # all packed rows are the first member's
    weight = second.bert.encoder.layer[0].intermediate.dense.weight
    assert family.blocks.index.total_rows - rows_before == math.ceil(weight.numel() / 64)
    assert (family.member_path("second") / "extras.safetensors").stat().st_size < 100  # no tensor in it
    loaded = DedupedModel.from_pretrained(family.member_path("second")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in second.state_dict().items())
