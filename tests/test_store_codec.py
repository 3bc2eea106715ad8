"""Entropy-coded block stores (``codec="zipnn"``): lossless, checked, append-only, versioned."""

from __future__ import annotations

import json

import pytest
import torch

from hf_dpdedup import Codec, DedupedModel, FamilyStore, push_family_to_hub
from hf_dpdedup.errors import (
    ChecksumMismatchError,
    StoreFormatError,
    UnknownCodecError,
    UnsupportedFormatVersionError,
)
from hf_dpdedup.store import BlockStore
from hf_dpdedup.store.codec import decode_rows, encode_rows
from hf_dpdedup.store.decoded_cache import CACHE_ENV
from hf_dpdedup.store.format import CODED_FORMAT, FORMAT, INDEX_FILE, SHARD_INDEX_FORMAT, check_format
from hf_dpdedup.store.io import forget_verified
from hf_dpdedup.store.records import DedupRecord
from hf_dpdedup.store.row_digests import row_hashes

from block_support import list_row_hashes
from conftest import example_inputs, tiny_model
from hub_support import family_models, hub, logits, make_family  # noqa: F401

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def decoded_cache(tmp_path, monkeypatch):
    """Each test gets its own decoded-shard cache (never the user's)."""
    folder = tmp_path / "decoded-cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    forget_verified()
    return folder


def perturbed(model, *, tensors: int, seed: int = 0):
    """A copy of ``model`` with its first ``tensors`` block-sized weights moved a little."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for name in [k for k, v in out.items() if v.numel() >= 128][:tensors]:
        out[name] += (1e-3 * torch.randn(out[name].shape, generator=g)).to(out[name].dtype)
    copy = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    copy.load_state_dict(out)
    return copy


def assert_bit_exact(original, loaded, kind="bert"):
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    with torch.no_grad():
        inputs = example_inputs(kind)
        assert torch.equal(original(**inputs).logits, loaded(**inputs).logits)


def coded_family(tmp_path, dtype, name="fam"):
    return FamilyStore.create(tmp_path / name, block_size=128, dtype=dtype, codec="zipnn")


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_rows_round_trip_bit_exact_through_the_codec(dtype):
    rows = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows[5] = 0  # all-zero and repeated rows must survive too
    rows[6] = rows[7]
    stored = encode_rows(rows, Codec.ZIPNN)
    assert stored.dtype == torch.uint8 and stored.dim() == 1
    decoded = decode_rows(stored, Codec.ZIPNN, num_rows=37, block_size=96, dtype=dtype, what="test")
    assert decoded.dtype == dtype and torch.equal(decoded.view(torch.uint8), rows.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_coded_family_loads_bit_exact(tmp_path, dtype):
    model = tiny_model("bert").to(dtype).eval()
    family = coded_family(tmp_path, dtype)
    family.add_model("m", model)
    index = json.loads((family.blocks.path / INDEX_FILE).read_text())
    assert index["format"] == SHARD_INDEX_FORMAT and index["codec"] == "zipnn" and "row_hashes" not in index
    assert_bit_exact(model, DedupedModel.from_pretrained(family.member_path("m")))


@pytest.mark.parametrize("dtype", DTYPES)
def test_appending_to_a_coded_store_adds_only_new_rows(tmp_path, dtype):
    base = tiny_model("bert").to(dtype).eval()
    target = perturbed(base, tensors=2)
    family = coded_family(tmp_path, dtype)
    family.add_model("base", base)
    rows_before, shards_before = family.blocks.index.total_rows, family.blocks.index.shards
    family.add_model("target", target)
    reopened = FamilyStore.open(family.root)
    assert reopened.blocks.codec is Codec.ZIPNN
    assert reopened.blocks.index.shards[: len(shards_before)] == shards_before  # append-only
    changed = [v for v in base.state_dict().values() if v.numel() >= 128][:2]
    # only the two moved tensors' blocks are new: the rest is shared, not stored again
    assert reopened.blocks.index.total_rows - rows_before == sum(-(-v.numel() // 128) for v in changed)
    forget_verified()
    assert_bit_exact(base, DedupedModel.from_pretrained(reopened.member_path("base")))
    assert_bit_exact(target, DedupedModel.from_pretrained(reopened.member_path("target")))


def test_coded_rows_are_addressed_by_their_raw_bytes(tmp_path):
    model = tiny_model("bert")
    raw = FamilyStore.create(tmp_path / "raw", block_size=128)
    raw.add_model("m", model)
    coded = coded_family(tmp_path, torch.float32)
    coded.add_model("m", model)
    assert coded.blocks.stored_row_hashes() == raw.blocks.stored_row_hashes()
    assert coded.constitution("m").tensors == raw.constitution("m").tensors


def test_corrupted_coded_shard_raises_the_checksum_error(tmp_path):
    family = coded_family(tmp_path, torch.float32)
    family.add_model("m", tiny_model("bert"))
    shard = family.blocks.path / family.blocks.index.shards[0].file
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0x04
    shard.write_bytes(bytes(data))
    forget_verified()
    with pytest.raises(ChecksumMismatchError, match="download it again"):
        DedupedModel.from_pretrained(family.member_path("m"))


def test_unverified_load_of_a_damaged_stream_header_is_a_typed_error(tmp_path):
    family = coded_family(tmp_path, torch.float32)
    family.add_model("m", tiny_model("bert"))
    store = family.blocks
    shard = store.index.shards[0]
    path = store.path / shard.file
    data = bytearray(path.read_bytes())
    start = len(data) - _stream_length(path)
    data[start + 16] ^= 0x01  # the stream's declared decoded length
    path.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match="damaged"):
        store.read_shards([shard], verify=False)


def _stream_length(path) -> int:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    start, end = header["blocks"]["data_offsets"]
    return end - start


@pytest.mark.parametrize("codec", ["none", "zipnn"])
def test_a_store_that_lists_row_hashes_keeps_its_format_when_appended_to(tmp_path, codec):
    """Stores written before hf_dpdedup/3 (format 1 raw, 2 coded, row hashes listed) are read, and
    appended to in their own format: a reader of that version still reads them afterwards."""
    base = tiny_model("bert")
    family = FamilyStore.create(tmp_path / "fam", block_size=128, codec=codec)
    family.add_model("base", base)
    list_row_hashes(family.blocks)
    family = FamilyStore.open(family.root)
    before = json.loads((family.blocks.path / INDEX_FILE).read_text())
    target = perturbed(base, tensors=2)
    family.add_model("target", target)
    index = json.loads((family.blocks.path / INDEX_FILE).read_text())
    old_format = FORMAT if codec == "none" else CODED_FORMAT
    # exactly the fields earlier versions wrote: a reader of that version reads it
    assert index["format"] == old_format and ("codec" in index) == (codec != "none")
    check_format(index, "old reader", accepted=(FORMAT, CODED_FORMAT))
    assert index["row_hashes"][: len(before["row_hashes"])] == before["row_hashes"]
    assert len(index["row_hashes"]) == index["total_rows"] > before["total_rows"]
    reopened = FamilyStore.open(family.root)
    shards = reopened.blocks.read_shards(reopened.blocks.index.shards)
    assert list(reopened.blocks.index.row_hashes) == row_hashes(torch.cat([shards[k] for k in sorted(shards)]))
    assert_bit_exact(target, DedupedModel.from_pretrained(reopened.member_path("target")))


def test_a_reader_of_the_listing_formats_refuses_a_new_store_with_upgrade_advice(tmp_path):
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    index = json.loads((family.blocks.path / INDEX_FILE).read_text())
    assert index["format"] == SHARD_INDEX_FORMAT and index["codec"] == "none"
    with pytest.raises(UnsupportedFormatVersionError, match="Upgrade hf_dpdedup"):
        check_format(index, "block_store.json", accepted=(FORMAT, CODED_FORMAT))


def test_a_reader_without_codecs_refuses_a_coded_store_with_upgrade_advice(tmp_path):
    family = coded_family(tmp_path, torch.float32)
    index = json.loads((family.blocks.path / INDEX_FILE).read_text())
    with pytest.raises(UnsupportedFormatVersionError, match="Upgrade hf_dpdedup"):
        check_format(index, "block_store.json")  # what a format-1-only reader checks


def test_unknown_codec_is_a_typed_error_saying_what_to_do(tmp_path):
    family = coded_family(tmp_path, torch.float32)
    family.add_model("m", tiny_model("bert"))
    path = family.blocks.path / INDEX_FILE
    index = json.loads(path.read_text())
    index["codec"] = "zstd-99"
    path.write_text(json.dumps(index))
    with pytest.raises(UnknownCodecError, match="zstd-99.*Upgrade hf_dpdedup"):
        DedupedModel.from_pretrained(family.member_path("m"))
    with pytest.raises(UnknownCodecError):
        BlockStore.create(tmp_path / "other", block_size=128, dtype="float32", codec="lzma")
    assert not (tmp_path / "other").exists()


def test_a_format_1_index_naming_a_codec_is_rejected(tmp_path):
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    list_row_hashes(family.blocks)
    path = family.blocks.path / INDEX_FILE
    index = json.loads(path.read_text())
    index["codec"] = "zipnn"
    path.write_text(json.dumps(index))
    with pytest.raises(StoreFormatError, match="has no codec"):
        FamilyStore.open(family.root)


@pytest.mark.parametrize("dtype", DTYPES)
def test_recode_keeps_rows_and_members(tmp_path, dtype):
    base = tiny_model("bert").to(dtype).eval()
    target = perturbed(base, tensors=3, seed=1)
    raw = FamilyStore.create(tmp_path / "raw", block_size=128, dtype=dtype)
    raw.add_model("base", base, dedup=DedupRecord(base="base"))
    raw.add_model("target", target)
    coded = raw.recode(tmp_path / "coded", codec="zipnn")
    assert coded.members() == ["base", "target"]
    assert coded.blocks.codec is Codec.ZIPNN and coded.blocks.store_id != raw.blocks.store_id
    assert coded.blocks.stored_row_hashes() == raw.blocks.stored_row_hashes()
    assert coded.constitution("base").dedup == DedupRecord(base="base")
    assert sum(s.bytes for s in coded.blocks.index.shards) < sum(s.bytes for s in raw.blocks.index.shards)
    assert_bit_exact(base, DedupedModel.from_pretrained(coded.member_path("base")))
    assert_bit_exact(target, DedupedModel.from_pretrained(coded.member_path("target")))


def test_first_load_fills_the_decoded_cache_and_later_loads_map_it(tmp_path, decoded_cache):
    model = tiny_model("bert")
    family = coded_family(tmp_path, torch.float32)
    family.add_model("m", model)
    shards = family.blocks.index.shards
    assert all(s.raw_sha256 for s in shards)
    assert not decoded_cache.exists()  # writing a store decodes nothing
    assert_bit_exact(model, DedupedModel.from_pretrained(family.member_path("m")))
    cached = sorted(p.name for p in decoded_cache.iterdir())
    assert cached == sorted(f"{s.raw_sha256}.rows" for s in shards)
    for s in shards:  # the coded shards are no longer read: the cache serves the rows
        (family.blocks.path / s.file).write_bytes(b"gone")
    forget_verified()
    assert_bit_exact(model, DedupedModel.from_pretrained(family.member_path("m")))


def test_a_damaged_cache_file_is_decoded_again_not_trusted(tmp_path, decoded_cache):
    model = tiny_model("bert")
    family = coded_family(tmp_path, torch.float32)
    family.add_model("m", model)
    DedupedModel.from_pretrained(family.member_path("m"))
    victim = next(decoded_cache.iterdir())
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    forget_verified()
    assert_bit_exact(model, DedupedModel.from_pretrained(family.member_path("m")))
    assert bytes(data) != victim.read_bytes()  # rewritten from the coded shard


def test_loads_work_with_the_cache_off_or_unwritable(tmp_path, monkeypatch):
    model = tiny_model("bert")
    family = coded_family(tmp_path, torch.float32)
    family.add_model("m", model)
    monkeypatch.setenv(CACHE_ENV, "off")
    assert_bit_exact(model, DedupedModel.from_pretrained(family.member_path("m")))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    forget_verified()
    assert_bit_exact(model, DedupedModel.from_pretrained(family.member_path("m")))


def test_a_coded_family_round_trips_through_the_hub_fetching_only_needed_shards(hub, tmp_path):
    models = family_models()
    coded = make_family(tmp_path / "tiny", models).recode(tmp_path / "tiny-zipnn", codec="zipnn")
    push_family_to_hub(coded, "alice", token="hf_write", endpoint=hub.url)
    for name, original in models.items():
        hub.log.clear()
        loaded = DedupedModel.from_pretrained(f"alice/tiny-zipnn-{name}", endpoint=hub.url,
                                              cache_dir=tmp_path / f"c-{name}")
        assert torch.equal(logits(loaded), logits(original))
        needed = {s.file for s in coded.blocks.shards_for_rows(coded.constitution(name).all_rows)}
        assert set(hub.fetched("alice/tiny-zipnn-blocks")) == {"block_store.json"} | needed
