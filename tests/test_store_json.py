"""The store's JSON text: the same data as ``json.dumps``, with lists of scalars kept on one line."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.store.family import FamilyStore
from hf_dpdedup.store.io import json_text

from block_support import list_row_hashes
from conftest import tiny_model

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(values)
def test_json_text_reads_back_as_json_dumps(value) -> None:
    assert json.loads(json_text(value)) == json.loads(json.dumps(value))


def test_row_lists_take_one_line_each(tmp_path) -> None:
    """A member's row ids and a listed index's row hashes are one line each, not one line per entry."""
    family = FamilyStore.create(tmp_path / "fam", block_size=256)
    family.add_model("base", tiny_model("bert"))
    list_row_hashes(family.blocks)  # as the formats before hf_dpdedup/3 write them
    index = (family.blocks.path / "block_store.json").read_text()
    hashes = json.loads(index)["row_hashes"]
    assert len(hashes) > 10
    assert f'  "row_hashes": {json.dumps(hashes, separators=(",", ":"))}' in index.splitlines()[-2:]
    constitution = (family.member_path("base") / "dedup_constitution.json").read_text()
    lines = constitution.splitlines()
    data = json.loads(constitution)
    for tensor in data["tensors"]:
        assert f'"rows": {json.dumps(tensor["rows"], separators=(",", ":"))}' in constitution
    # each tensor, packed extra and shard entry is one line of its own
    for entry in [*data["tensors"], *data["packed_extras"], *json.loads(index)["shards"]]:
        assert sum(f'"name": "{entry.get("name")}"' in line or f'"file": "{entry.get("file")}"' in line
                   for line in [*lines, *index.splitlines()]) == 1
    assert len(lines) < len(data["tensors"]) + len(data["packed_extras"]) + 60
