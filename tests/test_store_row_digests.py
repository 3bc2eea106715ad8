"""Row hashes derived from the shards (index format ``hf_dpdedup/3``): the index lists shards only,
writers derive the stored rows' sha256 from the shards or a machine cache checked against the
index, and no damage to that cache ever maps a block to a wrong row or stores a row twice."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.errors import HfDpDedupError, StoreFormatError
from hf_dpdedup.store import BlockStore
from hf_dpdedup.store import row_digests
from hf_dpdedup.store.check import problems
from hf_dpdedup.store.format import INDEX_FILE, SHARD_INDEX_FORMAT
from hf_dpdedup.store.io import forget_verified
from hf_dpdedup.store.row_digests import CACHE_ENV, content_key, row_hashes

from conftest import tiny_model

BLOCK = 64


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "row-hash-cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def distinct_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, BLOCK, generator=torch.Generator().manual_seed(seed))


def all_rows(store: BlockStore) -> torch.Tensor:
    shards = store.read_shards(store.index.shards)
    return torch.cat([shards[k] for k in sorted(shards)]) if shards else torch.empty(0, BLOCK)


def assert_rows_are(store: BlockStore, ids: list[int], matrix: torch.Tensor) -> None:
    """Every input row is stored at the id returned for it, and the store holds no row twice."""
    stored = all_rows(store)
    assert torch.equal(stored[torch.tensor(ids)].view(torch.uint8), matrix.contiguous().view(torch.uint8))
    assert len(set(row_hashes(stored))) == len(stored)


def test_a_new_index_lists_shards_only_and_does_not_grow_with_rows(tmp_path, cache):
    sizes = {}
    for rows in (10, 1000):
        store = BlockStore.create(tmp_path / f"s{rows}", block_size=BLOCK, dtype=torch.float32)
        store.add_rows(distinct_rows(rows))
        text = (store.path / INDEX_FILE).read_text()
        index = json.loads(text)
        assert index["format"] == SHARD_INDEX_FORMAT and "row_hashes" not in index
        assert index["total_rows"] == rows and len(index["shards"]) == 1
        sizes[rows] = len(text)
    assert sizes[1000] - sizes[10] <= 8  # only the digits of the row counts differ


def test_the_shard_row_hash_digest_is_the_sha256_of_its_rows_hashes(tmp_path, cache):
    matrix = distinct_rows(50)
    store = BlockStore.create(tmp_path / "s", block_size=BLOCK, dtype=torch.float32)
    store.add_rows(matrix, max_shard_bytes=20 * BLOCK * 4)  # three shards
    assert len(store.index.shards) == 3
    digests = [hashlib.sha256(row.numpy().tobytes()).digest() for row in matrix]
    for shard in store.index.shards:
        listing = b"".join(digests[shard.first_row : shard.end_row])
        assert shard.row_hashes_sha256 == hashlib.sha256(listing).hexdigest()
        # the cache file of each shard, named by the shard's content, holds exactly those bytes
        assert (cache / f"{content_key(shard)}.sha256").read_bytes() == listing


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_a_new_writer_reuses_every_stored_row(tmp_path, monkeypatch, cached):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache") if cached else "off")
    first = distinct_rows(40)
    store = BlockStore.create(tmp_path / "s", block_size=BLOCK, dtype=torch.float32)
    ids = store.add_rows(first, max_shard_bytes=16 * BLOCK * 4)
    assert (tmp_path / "cache").exists() == cached
    again = BlockStore.open(store.path)  # a new writer: nothing in its memory
    mixed = torch.cat([first[::3], distinct_rows(7, seed=1)])
    got = again.add_rows(mixed)
    assert got[: len(first[::3])] == ids[::3]
    assert again.index.total_rows == 47
    assert_rows_are(again, got, mixed)


def _swap(raw: bytes) -> bytes:
    return raw[32:64] + raw[:32] + raw[64:]


CACHE_DAMAGE = {
    "two hashes swapped": _swap,
    "zeros": lambda raw: bytes(len(raw)),
    "truncated": lambda raw: raw[:-32],
    "empty": lambda raw: b"",
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_a_damaged_cache_file_is_not_trusted(tmp_path, cache, case):
    """Swapped hashes would map blocks to wrong rows, zeros would store every row again: the cache
    is checked against the index's ``row_hashes_sha256`` and derived again from the shard."""
    matrix = distinct_rows(30)
    store = BlockStore.create(tmp_path / "s", block_size=BLOCK, dtype=torch.float32)
    ids = store.add_rows(matrix)
    (victim,) = cache.iterdir()
    good = victim.read_bytes()
    victim.write_bytes(CACHE_DAMAGE[case](good))
    again = BlockStore.open(store.path)
    assert again.add_rows(matrix) == ids
    assert again.index.total_rows == 30
    assert victim.read_bytes() == good  # derived again from the shard and cached


def test_a_shard_whose_rows_disagree_with_the_index_is_refused_and_nothing_written(tmp_path, cache):
    store = BlockStore.create(tmp_path / "s", block_size=BLOCK, dtype=torch.float32)
    store.add_rows(distinct_rows(30))
    for f in cache.iterdir():
        f.unlink()
    path = store.path / INDEX_FILE
    index = json.loads(path.read_text())
    index["shards"][0]["row_hashes_sha256"] = "0" * 64
    path.write_text(json.dumps(index))
    before = sorted(p.name for p in store.path.iterdir())
    with pytest.raises(StoreFormatError, match="row_hashes_sha256") as excinfo:
        BlockStore.open(store.path).add_rows(distinct_rows(5, seed=3))
    assert isinstance(excinfo.value, HfDpDedupError) and "restore" in str(excinfo.value)
    assert sorted(p.name for p in store.path.iterdir()) == before
    assert json.loads(path.read_text()) == index


def test_inspect_verify_checks_each_shards_row_hash_digest(tmp_path, cache):
    store = BlockStore.create(tmp_path / "s", block_size=BLOCK, dtype=torch.float32)
    store.add_rows(distinct_rows(30), max_shard_bytes=10 * BLOCK * 4)
    assert problems(store.path, verify=True) == []
    path = store.path / INDEX_FILE
    index = json.loads(path.read_text())
    index["shards"][1]["row_hashes_sha256"] = index["shards"][0]["row_hashes_sha256"]
    path.write_text(json.dumps(index))
    (found,) = problems(store.path, verify=True)
    assert index["shards"][1]["file"] in found and "row_hashes_sha256" in found and "restore" in found
    assert problems(store.path, verify=False) == []  # the cheap check reads no rows


def test_an_unwritable_cache_costs_only_time(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    matrix = distinct_rows(20)
    store = BlockStore.create(tmp_path / "s", block_size=BLOCK, dtype=torch.float32)
    ids = store.add_rows(matrix)
    assert BlockStore.open(store.path).add_rows(matrix) == ids


def test_a_family_appended_by_a_new_process_state_shares_its_rows(tmp_path, cache):
    """The end-to-end form: a family reopened with an empty cache stores an identical copy of a
    member as rows it already has, and both load bit-exactly."""
    model = tiny_model("bert")
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("a", model)
    rows = family.blocks.index.total_rows
    for f in cache.iterdir():
        f.unlink()
    reopened = FamilyStore.open(family.root)
    reopened.add_model("copy", model)
    assert reopened.blocks.index.total_rows == rows
    forget_verified()
    loaded = DedupedModel.from_pretrained(reopened.member_path("copy"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# rows drawn from a small pool, so that appends overlap; each step: (pool ids, whether the writer is new,
# whether the cache file of some shard is damaged first)
steps = st.lists(
    st.tuples(st.lists(st.integers(0, 23), min_size=1, max_size=12), st.booleans(), st.booleans()),
    min_size=1, max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_property_appends_address_rows_by_content(tmp_path_factory, steps):
    folder = tmp_path_factory.mktemp("prop")
    pool = distinct_rows(24, seed=9)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(folder / "cache"))
        store = BlockStore.create(folder / "s", block_size=BLOCK, dtype=torch.float32)
        id_of: dict[int, int] = {}
        for picks, new_writer, damage in steps:
            if damage and (folder / "cache").exists():
                for f in sorted((folder / "cache").iterdir())[:1]:
                    f.write_bytes(_swap(f.read_bytes()) if f.stat().st_size >= 64 else b"")
            if new_writer:
                store = BlockStore.open(store.path)
            matrix = pool[torch.tensor(picks)]
            ids = store.add_rows(matrix, max_shard_bytes=5 * BLOCK * 4)
            for pick, row in zip(picks, ids):
                assert id_of.setdefault(pick, row) == row  # a row once stored keeps its id
            assert_rows_are(store, ids, matrix)
        assert store.index.total_rows == len(id_of)  # nothing stored twice
        assert row_digests.cache_dir() == folder / "cache"
