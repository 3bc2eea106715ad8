"""Fault corpus of the store (issue 17): each case once returned wrong weights silently, crashed with
an untyped error, or gave no next step. Every case must now be caught, typed, and say what to do.

Crash and concurrency cases with real processes are in ``test_store_crash.py``; Hub cases in
``test_hub_faults.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.cli import main
from hf_dpdedup.errors import (
    ChecksumMismatchError,
    ConstitutionError,
    HfDpDedupError,
    PinnedRevisionError,
    StoreFormatError,
    UnsupportedFormatVersionError,
)
from hf_dpdedup.serving import ServingPool
from hf_dpdedup.store import BlockStore
from hf_dpdedup.store import block_store as block_store_module
from hf_dpdedup.store.io import forget_verified, sha256_file
from hf_dpdedup.store.member import update_dedup_record

from block_support import list_row_hashes, plain_rows, with_own_small_tensors  # a's and b's shards: as many rows
from conftest import example_inputs, tiny_model

#: every message must name a next step
NEXT_STEP = re.compile(
    r"restore|re-run|re-save|download|re-push|re-create|copy|delete|upgrade|retry|load it again|"
    r"pass |give this user|open a new pool",
    re.I,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Members a (seed 0), b (seed 1), t (tied MLM) in one store; copied for each test."""
    root = tmp_path_factory.mktemp("faults") / "fam"
    family = FamilyStore.create(root, block_size=128)
    family.add_model("a", member_a())
    family.add_model("b", member_b())
    family.add_model("t", tiny_model("bert-mlm", seed=2))
    return root


def member_a():
    return with_own_small_tensors(tiny_model("bert", seed=0), seed=10)


def member_b():
    return with_own_small_tensors(tiny_model("bert", seed=1), seed=11)


@pytest.fixture
def family(template, tmp_path):
    shutil.copytree(template, tmp_path / "fam")
    forget_verified()
    return FamilyStore.open(tmp_path / "fam")


def index_path(family) -> Path:
    return family.blocks.path / "block_store.json"


def constitution_path(family, name="a") -> Path:
    return family.member_path(name) / "dedup_constitution.json"


def edit_json(path: Path, change) -> None:
    """Apply ``change`` to the file's JSON; a change that returns a list replaces the whole value."""
    data = json.loads(path.read_text())
    replaced = change(data)
    path.write_text(json.dumps(replaced if isinstance(replaced, list) else data))


def load(family, name="a"):
    return DedupedModel.from_pretrained(family.member_path(name))


def same_weights(model, reference) -> bool:
    a, b = model.state_dict(), reference.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def says_what_to_do(message: str) -> bool:
    """The message names a next step (paths are left out: a temporary folder's name could match)."""
    return bool(NEXT_STEP.search(re.sub(r"\S*/\S*", "", message)))


def assert_typed_with_next_step(excinfo) -> None:
    assert isinstance(excinfo.value, HfDpDedupError)
    assert says_what_to_do(str(excinfo.value)), str(excinfo.value)


# --- A. silent wrong results ---------------------------------------------------------------------------
def test_a1_two_shard_entries_naming_the_same_file(family):
    def alias_shard(d):
        first, second = d["shards"][0], d["shards"][1]
        assert first["num_rows"] == second["num_rows"]  # the dangerous case: shapes agree
        second.update({k: first[k] for k in ("file", "sha256", "bytes")})
        second.pop("xxh3_128", None)
        second["xxh3_128"] = first.get("xxh3_128")
        if second["xxh3_128"] is None:
            del second["xxh3_128"]

    edit_json(index_path(family), alias_shard)
    with pytest.raises(StoreFormatError) as excinfo:
        load(family, "b")
    assert_typed_with_next_step(excinfo)


def test_a1_index_entry_naming_another_shards_intact_file(family):
    """Unique names, each file intact, but the entries swapped: the shard header gives it away."""
    def swap(d):
        first, second = d["shards"][0], d["shards"][1]
        keys = ("file", "sha256", "bytes", "xxh3_128")
        a, b = {k: first.get(k) for k in keys}, {k: second.get(k) for k in keys}
        first.update(b)
        second.update(a)
        for entry in (first, second):
            if entry.get("xxh3_128") is None:
                entry.pop("xxh3_128", None)

    edit_json(index_path(family), swap)
    with pytest.raises(StoreFormatError, match="holds rows from") as excinfo:
        load(family, "b")
    assert_typed_with_next_step(excinfo)


def test_a2_duplicate_row_hash_is_refused(family):
    """A store of the formats that list row hashes (before ``hf_dpdedup/3``)."""
    list_row_hashes(family.blocks)

    def duplicate(d):
        d["row_hashes"][5] = d["row_hashes"][7]

    edit_json(index_path(family), duplicate)
    with pytest.raises(StoreFormatError, match="same row hash") as excinfo:
        family = FamilyStore.open(family.root)
        family.add_model("copy", member_a())
    assert_typed_with_next_step(excinfo)


def test_a2_swapped_row_hashes_never_map_a_copy_to_wrong_rows(family):
    list_row_hashes(family.blocks)
    rows_before = len(json.loads(index_path(family).read_text())["row_hashes"])

    def swap(d):
        d["row_hashes"][5], d["row_hashes"][7] = d["row_hashes"][7], d["row_hashes"][5]

    edit_json(index_path(family), swap)
    family = FamilyStore.open(family.root)
    with pytest.raises(StoreFormatError, match="do not match the rows") as excinfo:
        family.add_model("copy", member_a())
    assert_typed_with_next_step(excinfo)
    assert len(json.loads(index_path(family).read_text())["row_hashes"]) == rows_before
    assert "copy" not in family.members()


def test_a3_fractional_row_id(family):
    edit_json(constitution_path(family), lambda d: d["tensors"][0].__setitem__("rows", [16.5, *plain_rows(d)[1:]]))
    with pytest.raises(ConstitutionError, match="16.5") as excinfo:
        load(family)
    assert_typed_with_next_step(excinfo)


def test_a4_tensor_listed_twice(family):
    def twice(d):
        first = dict(d["tensors"][0])
        first["rows"] = list(reversed(plain_rows(d)))
        d["tensors"].append(first)

    edit_json(constitution_path(family), twice)
    with pytest.raises(ConstitutionError, match="twice") as excinfo:
        load(family)
    assert_typed_with_next_step(excinfo)


def _rewrite_extras(family, change, name="a"):
    path = family.member_path(name) / "extras.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})

    def record(d):
        d["extras"]["sha256"] = sha256_file(path)
        d["extras"].pop("xxh3_128", None)

    edit_json(constitution_path(family, name), record)


def test_a5_extras_file_holding_a_tensor_its_constitution_does_not_list(family):
    def smuggle(tensors):  # the model's small floats are packed into rows: the file holds none of them
        tensors["bert.embeddings.LayerNorm.weight"] = torch.ones(32, dtype=torch.float16)

    _rewrite_extras(family, smuggle)
    with pytest.raises(ConstitutionError, match="extras.safetensors") as excinfo:
        load(family)
    assert_typed_with_next_step(excinfo)


def test_a6_shard_modified_in_place_with_mtime_kept(family):
    reference = load(family)  # verified once in this process
    shard = family.blocks.path / family.blocks.index.shards[0].file
    st = shard.stat()
    with open(shard, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-4, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0x40]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns and shard.stat().st_size == st.st_size
    with pytest.raises(ChecksumMismatchError) as excinfo:
        loaded = load(family)
        assert same_weights(loaded, reference)  # (today: a modified value, silently)
    assert_typed_with_next_step(excinfo)


def test_a7_pool_serves_packed_extras_from_checked_rows(family):
    """Biases and norms are packed into rows: the pool serves them from the rows it verified, and a
    member whose packed rows were corrupted after the pool opened is refused, not served."""
    pool = ServingPool(family.root, members=["a", "b"])
    for name, model in (("a", member_a()), ("b", member_b())):
        inputs = example_inputs("bert")
        assert torch.equal(pool.infer(name, **inputs).logits, model.eval()(**inputs).logits)
    shard = family.blocks.path / family.blocks.index.shards[1].file  # b's rows, packed extras included
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x20  # inside b's last row: its packed extras
    shard.write_bytes(bytes(data))
    forget_verified()
    with pytest.raises(ChecksumMismatchError) as excinfo:
        ServingPool(family.root, members=["b"]).infer("b", **example_inputs("bert"))
    assert_typed_with_next_step(excinfo)


# --- B. crash safety, writes, CLI (single process) ---------------------------------------------------
def test_b11_stale_temporaries_are_cleaned_up_under_the_lock(family):
    (family.blocks.path / ".blocks-00009.safetensors.abc123.tmp").write_bytes(b"half a shard")
    (family.blocks.path / ".block_store.json.def456.tmp").write_text("{")
    stale = family.root / "members" / ".a.xyz789.tmp"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    family.add_model("c", tiny_model("bert", seed=4))
    leftovers = [p.name for d in (family.blocks.path, family.root / "members") for p in d.iterdir()
                 if p.name.endswith(".tmp")]
    assert leftovers == []
    assert same_weights(load(family, "c"), tiny_model("bert", seed=4))


def test_b12_add_without_config_appends_no_rows(family, tmp_path):
    before = index_path(family).read_bytes()
    shards = sorted(p.name for p in family.blocks.path.iterdir())
    folder = tmp_path / "no-config"
    folder.mkdir()
    (folder / "vocab.txt").write_text("a\n")
    with pytest.raises(StoreFormatError, match="config.json") as excinfo:
        family.add_model("x", tiny_model("bert", seed=8).state_dict(), files_from=folder)
    assert_typed_with_next_step(excinfo)
    assert index_path(family).read_bytes() == before
    assert sorted(p.name for p in family.blocks.path.iterdir()) == shards


def test_b15_inspect_exits_non_zero_on_a_truncated_shard(family, capsys):
    shard = family.blocks.path / family.blocks.index.shards[1].file
    shard.write_bytes(shard.read_bytes()[:-64])
    assert main(["inspect", str(family.root)]) != 0
    assert main(["inspect", str(family.root), "--verify"]) != 0
    err = capsys.readouterr().err
    assert "truncated" in err and says_what_to_do(err)


def test_b15_inspect_verify_catches_a_flipped_byte_of_the_same_size(family, capsys):
    shard = family.blocks.path / family.blocks.index.shards[0].file
    data = bytearray(shard.read_bytes())
    data[-9] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(family.root)]) == 0  # sizes only: not visible
    assert main(["inspect", str(family.root), "--verify"]) == 1
    assert "corrupted" in capsys.readouterr().err


def test_inspect_verify_passes_on_an_intact_family(family):
    assert main(["inspect", str(family.root), "--verify"]) == 0


# --- C. untyped crashes become typed errors that say what to do -------------------------------------
def _shard_unreadable(family, monkeypatch):
    """Root reads any file whatever its mode: refuse opening the shard the way a mode-000 file is
    refused to an ordinary user."""
    shard = str(family.blocks.path / family.blocks.index.shards[0].file)
    real_open = open

    def guarded(path, *args, **kwargs):
        if str(path) == shard:
            raise PermissionError(13, "Permission denied", shard)
        return real_open(path, *args, **kwargs)

    os.chmod(shard, 0)
    for module in (block_store_module, __import__("hf_dpdedup.store.io", fromlist=["x"])):
        monkeypatch.setattr(module, "open", guarded, raising=False)


def _index_is_a_folder(family, monkeypatch):
    index_path(family).unlink()
    index_path(family).mkdir()


def _shard_entry_not_an_object(family, monkeypatch):
    edit_json(index_path(family), lambda d: d["shards"].__setitem__(0, "blocks-00001.safetensors"))


def _row_hash_not_a_string(family, monkeypatch):
    list_row_hashes(family.blocks)
    edit_json(index_path(family), lambda d: d["row_hashes"].__setitem__(0, ["not", "a", "hash"]))


def _constitution_shape_disagrees(family, monkeypatch):
    def transpose(d):
        entry = next(t for t in d["tensors"] if len(t["shape"]) == 2 and t["shape"][0] != t["shape"][1])
        entry["shape"] = entry["shape"][::-1]

    edit_json(constitution_path(family), transpose)


def _packed_extra_shape_disagrees(family, monkeypatch):
    def reshape(d):  # the same values (the slices still tile the packed rows), another shape
        first = d["packed_extras"][0]
        assert first["shape"] == [2, 32]  # token type embeddings
        first["shape"] = [4, 16]

    edit_json(constitution_path(family, "a"), reshape)


def _config_disagrees(family, monkeypatch):
    edit_json(family.member_path("a") / "config.json", lambda d: d.__setitem__("intermediate_size", 48))


def _alias_with_a_bad_module_path(family, monkeypatch):
    def bad_alias(d):
        alias, canonical = next(iter(d["aliases"].items()))
        d["aliases"] = {"no.such.module.weight": canonical}

    edit_json(constitution_path(family, "t"), bad_alias)


def _config_missing(family, monkeypatch):
    (family.member_path("a") / "config.json").unlink()


def _config_not_json(family, monkeypatch):
    (family.member_path("a") / "config.json").write_text("{oops")


def _config_unknown_model_type(family, monkeypatch):
    edit_json(family.member_path("a") / "config.json", lambda d: d.__setitem__("model_type", "no-such-model"))


def _store_repo_id_is_a_path(family, monkeypatch):
    edit_json(constitution_path(family), lambda d: d.__setitem__("block_store", {
        "store_id": d["block_store"]["store_id"], "path": None, "repo_id": "../../../etc", "revision": "a" * 40}))


UNTYPED = {
    "unreadable shard": (_shard_unreadable, "a", StoreFormatError),
    "index is a folder": (_index_is_a_folder, "a", StoreFormatError),
    "shard entry not an object": (_shard_entry_not_an_object, "a", StoreFormatError),
    "row hash not a string": (_row_hash_not_a_string, "a", StoreFormatError),
    "constitution shape disagrees": (_constitution_shape_disagrees, "a", ConstitutionError),
    "packed extra shape disagrees": (_packed_extra_shape_disagrees, "a", ConstitutionError),
    "config.json disagrees": (_config_disagrees, "a", ConstitutionError),
    "alias with a bad module path": (_alias_with_a_bad_module_path, "t", ConstitutionError),
    "config.json missing": (_config_missing, "a", StoreFormatError),
    "config.json not JSON": (_config_not_json, "a", StoreFormatError),
    "unknown model_type": (_config_unknown_model_type, "a", StoreFormatError),
    "store repo id is a path": (_store_repo_id_is_a_path, "a", PinnedRevisionError),
}


@pytest.mark.parametrize("case", list(UNTYPED))
def test_c_untyped_crashes_are_typed(family, monkeypatch, case):
    damage, member, error = UNTYPED[case]
    damage(family, monkeypatch)
    with pytest.raises(error) as excinfo:
        load(family, member)
    assert_typed_with_next_step(excinfo)


@pytest.mark.parametrize("case", ["constitution shape disagrees", "config.json disagrees"])
def test_c_errors_name_the_file_that_disagrees(family, monkeypatch, case):
    UNTYPED[case][0](family, monkeypatch)
    with pytest.raises(ConstitutionError, match="dedup_constitution.json.*config.json"):
        load(family)


def test_c_served_member_folder_removed_after_the_pool_opened(family):
    pool = ServingPool(family.root, members=["a", "b"])
    shutil.rmtree(family.member_path("b"))
    with pytest.raises(StoreFormatError) as excinfo:
        pool.infer("b", **example_inputs("bert"))
    assert_typed_with_next_step(excinfo)
    pool.infer("a", **example_inputs("bert"))  # the others still serve


# --- D. typed errors name a next step ----------------------------------------------------------------
def _drop(key):
    return lambda d: d.pop(key)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _shard(key, value):
    def change(d):
        if value is ...:
            d["shards"][0].pop(key)
        else:
            d["shards"][0][key] = value
    return change


def _tensor(key, value):
    return lambda d: d["tensors"][0].__setitem__(key, value)


INDEX_DAMAGE = {
    "store_id missing": _drop("store_id"),
    "store_id not a string": _set("store_id", 7),
    "dtype missing": _drop("dtype"),
    "dtype unknown": _set("dtype", "float64"),
    "block_size zero": _set("block_size", 0),
    "shards not a list": _set("shards", {"a": 1}),
    "shard file missing": _shard("file", ...),
    "shard file is a path": _shard("file", "../x.safetensors"),
    "shard first_row a string": _shard("first_row", "0"),
    "shard num_rows missing": _shard("num_rows", ...),
    "shard bytes missing": _shard("bytes", ...),
    "shard sha256 missing": _shard("sha256", ...),
    "total_rows wrong": lambda d: d.__setitem__("total_rows", d["total_rows"] + 1),
    "codec missing": _drop("codec"),
    "row hashes in a shards-only index": _set("row_hashes", []),
    "shards do not tile": lambda d: d["shards"][1].__setitem__("first_row", d["shards"][1]["first_row"] + 1),
    "index is a list": lambda d: [d],
}

CONSTITUTION_DAMAGE = {
    "block_store missing": _drop("block_store"),
    "extras missing": _drop("extras"),
    "extras sha256 not a string": lambda d: d["extras"].__setitem__("sha256", 5),
    "dtype unknown": _set("dtype", "float64"),
    "block_size not an integer": _set("block_size", "x"),
    "numel disagrees with shape": _tensor("numel", 3),
    "constitution is a list": lambda d: [d],
    "block store path leads nowhere": lambda d: d["block_store"].__setitem__("path", "../../nowhere"),
}


#: damage to an index of the formats that list row hashes (before ``hf_dpdedup/3``)
LISTED_INDEX_DAMAGE = {
    "row_hashes not a list": _set("row_hashes", "abc"),
    "row hash missing": lambda d: d["row_hashes"].pop(),
    "total_rows wrong": lambda d: d.__setitem__("total_rows", d["total_rows"] + 1),
}


@pytest.mark.parametrize("case", [*INDEX_DAMAGE, *(f"listed: {c}" for c in LISTED_INDEX_DAMAGE)])
def test_d_index_damage_names_a_next_step(family, case):
    if case.startswith("listed: "):
        list_row_hashes(family.blocks)
        damage = LISTED_INDEX_DAMAGE[case.removeprefix("listed: ")]
    else:
        damage = INDEX_DAMAGE[case]
    edit_json(index_path(family), damage)
    with pytest.raises(StoreFormatError) as excinfo:
        load(family)
    assert_typed_with_next_step(excinfo)
    assert not isinstance(excinfo.value, UnsupportedFormatVersionError)


@pytest.mark.parametrize("case", list(CONSTITUTION_DAMAGE))
def test_d_constitution_damage_names_a_next_step(family, case):
    edit_json(constitution_path(family), CONSTITUTION_DAMAGE[case])
    with pytest.raises(StoreFormatError) as excinfo:
        load(family)
    assert_typed_with_next_step(excinfo)


@pytest.mark.parametrize("target", ["index", "constitution"])
def test_d_missing_format_is_damage_not_a_version(family, target):
    path = index_path(family) if target == "index" else constitution_path(family)
    edit_json(path, _drop("format"))
    with pytest.raises(StoreFormatError, match="damaged") as excinfo:
        load(family)
    assert not isinstance(excinfo.value, UnsupportedFormatVersionError)
    assert "Upgrade" not in str(excinfo.value)


def test_d_shard_of_another_shape_names_a_next_step(family):
    shard = family.blocks.path / family.blocks.index.shards[0].file
    block_store_module.save_shard(shard, torch.zeros(3, 128), {"format": "hf_dpdedup/1", "first_row": "0"})

    def record(d):
        d["shards"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
        d["shards"][0].pop("xxh3_128", None)

    edit_json(index_path(family), record)
    with pytest.raises(StoreFormatError, match="expects") as excinfo:
        load(family)
    assert_typed_with_next_step(excinfo)


def test_d_unknown_index_keys_are_kept_on_the_next_write(family):
    def add_fields(d):
        d["future_field"] = {"x": 1}
        d["shards"][0]["future_shard_field"] = 2

    edit_json(index_path(family), add_fields)
    FamilyStore.open(family.root).add_model("c", tiny_model("bert", seed=6))
    data = json.loads(index_path(family).read_text())
    assert data["future_field"] == {"x": 1} and data["shards"][0]["future_shard_field"] == 2


def test_d_unknown_constitution_keys_are_kept_on_the_next_write(family):
    edit_json(constitution_path(family), _set("future_field", [1, 2]))
    update_dedup_record(family.member_path("a"), {"base": "b"})
    data = json.loads(constitution_path(family).read_text())
    assert data["future_field"] == [1, 2] and data["dedup"]["base"] == "b"


# --- what held before, and must keep holding -----------------------------------------------------------
def test_intact_members_still_load_bit_exactly(family):
    assert same_weights(load(family, "a"), member_a())
    assert same_weights(load(family, "b"), member_b())
    assert same_weights(load(family, "t"), tiny_model("bert-mlm", seed=2))


def test_store_still_opens_old_indexes_without_fast_digests(family):
    """Stores written before xxh3 digests existed are checked with sha256 instead."""
    def drop_fast_digests(d):
        for shard in d["shards"]:
            shard.pop("xxh3_128", None)

    edit_json(index_path(family), drop_fast_digests)
    edit_json(constitution_path(family), lambda d: d["extras"].pop("xxh3_128", None))
    assert BlockStore.open(family.blocks.path).index.shards[0].xxh3_128 is None
    assert same_weights(load(family), member_a())
    shard = family.blocks.path / family.blocks.index.shards[0].file
    data = bytearray(shard.read_bytes())
    data[-3] ^= 2
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        load(family)
