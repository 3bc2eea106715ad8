"""Compact members (formats 3 and 4): runs of consecutive row ids written as ``[first, count]``, small
extras packed into block rows shared between members, and (format 4) entries without what the file
implies and names without their common prefix."""

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
from hf_dpdedup.blocks import PACKED_EXTRAS, PackedTensor, pack_extras, plan_layout, unpack_extras
from hf_dpdedup.errors import BlockLayoutError, ConstitutionError, UnsupportedFormatVersionError
from hf_dpdedup.hub.remote import REMOTE_CODE
from hf_dpdedup.store.family import FamilyStore
from hf_dpdedup.store.constitution import MIN_RUN, Constitution, StoreRef, TensorEntry, decode_rows, encode_rows, name_prefix
from hf_dpdedup.store.format import CONSTITUTION_FILE
from hf_dpdedup.store.summary import member_summary

from block_support import as_format_3, with_own_small_tensors
from conftest import tiny_model

ROWS = st.lists(st.integers(0, 60), max_size=40)


def remote_module():
    spec = importlib.util.spec_from_file_location("modeling_hf_dpdedup_row_runs_test", REMOTE_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def remote_row_ids():
    return remote_module().row_ids


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


def test_a_member_with_runs_is_format_4_and_loads_bit_exactly(member):
    family, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    assert data["format"] == "hf_dpdedup/4" and data["adapter"] is None
    # what the rest of the file implies is not written: dtype, numel, packed offsets
    assert all(set(t) == {"name", "shape", "rows"} for t in data["tensors"])
    assert all(set(p) == {"name", "shape"} for p in data["packed_extras"])
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


def test_runs_need_format_3_or_later_and_those_name_their_adapter_record(member):
    _, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    with pytest.raises(ConstitutionError, match="older format"):
        Constitution.from_dict({**data, "format": "hf_dpdedup/1"})
    with pytest.raises(ConstitutionError, match="adapter"):
        Constitution.from_dict({k: v for k, v in data.items() if k != "adapter"})
    with pytest.raises(UnsupportedFormatVersionError, match="Upgrade hf_dpdedup"):
        Constitution.from_dict({**data, "format": "hf_dpdedup/5"})
    with pytest.raises(ConstitutionError, match="adapter"):
        Constitution.from_dict({k: v for k, v in as_format_3(data).items() if k != "adapter"})


def test_format_3_as_earlier_versions_wrote_it_still_reads_the_same(member):
    family, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    old = as_format_3(data)
    assert Constitution.from_dict(old) == Constitution.from_dict(data) == family.constitution("m")
    with pytest.raises(ConstitutionError, match="recorded as None"):  # format 3 needs each entry's dtype
        Constitution.from_dict({**old, "tensors": [{k: v for k, v in t.items() if k != "dtype"} for t in old["tensors"]]})
    with pytest.raises(ConstitutionError, match="offset"):  # and each packed extra's offset
        Constitution.from_dict({**old, "packed_extras": [{"name": p["name"], "shape": p["shape"]}
                                                          for p in old["packed_extras"]]})
    with pytest.raises(ConstitutionError, match="name_prefix"):  # a prefix exists only in format 4
        Constitution.from_dict({**old, "name_prefix": "bert."})


def test_format_4_checks_what_it_is_given_beyond_what_it_needs(member):
    _, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    for edit, match in [
        (lambda d: d["tensors"][0].__setitem__("dtype", "float16"), "recorded as float16"),
        (lambda d: d["tensors"][0].__setitem__("numel", 7), "numel 7"),
        (lambda d: d["packed_extras"][1].__setitem__("offset", 1), "must follow each other"),
        (lambda d: d.__setitem__("name_prefix", 3), "name_prefix"),
    ]:
        broken = json.loads(json.dumps(data))
        edit(broken)
        with pytest.raises(ConstitutionError, match=match):
            Constitution.from_dict(broken)


NAME = st.text("ab.", min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(NAME, min_size=1, max_size=8, unique=True), st.sampled_from(["", "base_model.model.", "x."]),
       st.integers(0, 3), st.integers(0, 2))
def test_names_round_trip_through_the_prefix_in_the_library_and_the_remote_code(names, common, n_packed, n_alias):
    """Whatever the names, a format-4 file gives every name back whole (library and remote code
    alike), a written prefix ends with "." and leaves no name empty, and the reserved name never
    carries it."""
    names = [common + n for n in names]
    packed_names, alias_names = names[:n_packed], names[n_packed:n_packed + n_alias]
    tensor_names = names[n_packed + n_alias:] or [common + "w"]
    if set(tensor_names) & set(packed_names + alias_names):
        return
    tensors = [TensorEntry(n, (3,), "float32", (i,)) for i, n in enumerate(tensor_names)]
    packed = tuple(PackedTensor(n, (2,), 2 * i) for i, n in enumerate(packed_names))
    if packed:
        rows = tuple(range(len(tensors), len(tensors) + math.ceil(2 * len(packed) / 4)))
        tensors.append(TensorEntry(PACKED_EXTRAS, (2 * len(packed),), "float32", rows))
    constitution = Constitution(
        name="m", block_store=StoreRef("s", path="../s"), block_size=4, dtype="float32", tensors=tuple(tensors),
        extras_sha256="0" * 64, aliases={a: tensor_names[0] for a in alias_names}, packed=packed,
    )
    data = json.loads(json.dumps(constitution.to_dict()))
    if data["format"] == "hf_dpdedup/4":
        prefix = data.get("name_prefix", "")
        assert prefix == name_prefix([*tensor_names, *packed_names, *alias_names, *({tensor_names[0]} if alias_names else ())])
        assert not prefix or prefix.endswith(".")
        assert all(t["name"] for t in data["tensors"])
        assert not packed or PACKED_EXTRAS in [t["name"] for t in data["tensors"]]  # the reserved name: whole
    back = Constitution.from_dict(data)
    assert back == constitution
    remote_tensors, remote_packed, remote_aliases = remote_module().entries(data)
    assert [(t["name"], tuple(t["shape"])) for t in remote_tensors] == [(t.name, t.shape) for t in tensors]
    assert [(p["name"], tuple(p["shape"]), p["offset"]) for p in remote_packed] == [
        (p.name, p.shape, p.offset) for p in packed]
    assert remote_aliases == constitution.aliases


def test_the_prefix_is_cut_at_a_dot_and_never_empties_a_name():
    assert name_prefix(["base_model.model.a.w", "base_model.model.b.w"]) == "base_model.model."
    assert name_prefix(["enc.layer1.w", "enc.layer2.w"]) == "enc."  # not "enc.layer"
    assert name_prefix(["a.w", "a.w.x"]) == "a."
    assert name_prefix(["a.", "a.b"]) == ""  # "a." would leave the first name empty
    assert name_prefix(["bert.x", "classifier.w"]) == "" and name_prefix([]) == ""
    assert name_prefix(["m.w", f"m.{PACKED_EXTRAS}"]) == ""  # stripped, a name would read as the reserved one


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
        (lambda d: d["packed_extras"][1].__setitem__("offset", math.prod(packed[0]["shape"]) + 1), "must follow each other"),
        (lambda d: d["packed_extras"].pop(), "cover"),
        (lambda d: d.pop("packed_extras"), "missing"),
        (lambda d: d["packed_extras"][0].__setitem__("shape", "32"), "shape"),
        (lambda d: d["packed_extras"].append(dict(packed[0], name="another", offset=10 ** 6)), "follow each other"),
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
