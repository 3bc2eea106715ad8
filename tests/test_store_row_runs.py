"""Constitution row lists: runs of consecutive row ids written as ``[first, count]`` (format 3)."""

import importlib.util
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup import DedupedModel
from hf_dpdedup.errors import ConstitutionError, UnsupportedFormatVersionError
from hf_dpdedup.hub.remote import REMOTE_CODE
from hf_dpdedup.store.family import FamilyStore
from hf_dpdedup.store.constitution import MIN_RUN, Constitution, decode_rows, encode_rows
from hf_dpdedup.store.format import CONSTITUTION_FILE

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
    assert all(isinstance(t["rows"][0], list) for t in data["tensors"] if len(t["rows"]) >= MIN_RUN)
    written = sum(len(json.dumps(t["rows"])) for t in data["tensors"])
    plain = sum(len(json.dumps(decode_rows(t["rows"], t["name"]))) for t in data["tensors"])
    assert written * 5 < plain  # fresh rows: a few pairs instead of one id per block
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


def test_a_member_without_runs_keeps_format_1(member):
    _, folder = member
    data = json.loads((folder / CONSTITUTION_FILE).read_text())
    scattered = Constitution.from_dict(data)
    shuffled = [t.__class__(t.name, t.shape, t.dtype, tuple(reversed(t.rows))) for t in scattered.tensors]
    out = Constitution(**{**scattered.__dict__, "tensors": tuple(shuffled)}).to_dict()
    assert out["format"] == "hf_dpdedup/1" and "adapter" not in out
    assert Constitution.from_dict(json.loads(json.dumps(out))).tensors == tuple(shuffled)
