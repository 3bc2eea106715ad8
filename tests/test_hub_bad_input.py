"""Bad input on the Hub path: typed errors with a next step, and a cache that never holds half files."""

from __future__ import annotations

import json

import pytest
import torch

from hf_dpdedup import push_family_to_hub
from hf_dpdedup.errors import (
    HubChecksumError,
    HubDownloadError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    PinnedRevisionError,
)

from hf_dpdedup.hub.download import DOWNLOAD_ATTEMPTS

from hub_support import hub, load, logits, make_family, models  # noqa: F401

SHARD = "blocks-00002.safetensors"  # m1's own shard


@pytest.fixture(scope="module")
def family(models, tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("badhub") / "tiny", models)


@pytest.fixture
def pushed(hub, family):
    return push_family_to_hub(family, "alice", token="hf_write", endpoint=hub.url)


def partial_files(cache):
    return [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]


def test_unknown_repo(hub, tmp_path):
    with pytest.raises(HubRepoNotFoundError, match="Check the spelling"):
        load(hub, "alice/no-such-model", tmp_path)


def test_repo_without_a_constitution_is_not_a_member(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="hf_write")
    api.create_repo("alice/plain")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/plain")
    with pytest.raises(HubFileNotFoundError, match="not an hf_dpdedup member.*transformers"):
        load(hub, "alice/plain", tmp_path)


def test_store_commit_that_is_gone(hub, pushed, tmp_path):
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url, token="hf_write").super_squash_history("alice/tiny-blocks")
    with pytest.raises(PinnedRevisionError, match="does not exist any more.*hf-dpdedup push"):
        load(hub, "alice/tiny-m1", tmp_path)


def test_store_pinned_to_a_branch_is_refused(hub, pushed, tmp_path):
    from huggingface_hub import HfApi

    commit = hub.repos["alice/tiny-m0"].resolve("main")
    constitution = json.loads(hub.blobs[commit.files["dedup_constitution.json"]])
    constitution["block_store"]["revision"] = "main"
    HfApi(endpoint=hub.url, token="hf_write").upload_file(
        path_or_fileobj=json.dumps(constitution).encode(), path_in_repo="dedup_constitution.json",
        repo_id="alice/tiny-m0")
    with pytest.raises(PinnedRevisionError, match="not a commit sha"):
        load(hub, "alice/tiny-m0", tmp_path)


def test_shard_whose_sha256_does_not_match(hub, pushed, tmp_path):
    commit = hub.repos["alice/tiny-blocks"].resolve("main")
    good = hub.blobs[commit.files[SHARD]]
    hub.tamper("alice/tiny-blocks", SHARD, good[:-4] + b"\0\0\0\1")
    with pytest.raises(HubChecksumError, match="force_download=True"):
        load(hub, "alice/tiny-m1", tmp_path)
    hub.tamper("alice/tiny-blocks", SHARD, good)  # repaired upstream: a forced download recovers
    assert load(hub, "alice/tiny-m1", tmp_path, force_download=True).dedup_info.name == "m1"


def test_download_cut_midway_resumes(hub, pushed, models, tmp_path):
    hub.inject("GET", f"/resolve/.*/{SHARD}", "cut")
    loaded = load(hub, "alice/tiny-m1", tmp_path)
    assert torch.equal(logits(loaded), logits(models["m1"]))
    assert hub.fetched("alice/tiny-blocks").count(SHARD) == 2 and not partial_files(tmp_path)


def test_failed_download_leaves_no_half_file_and_a_retry_works(hub, pushed, models, tmp_path):
    hub.inject("GET", f"/resolve/.*/{SHARD}", "cut")
    # faults fire in turn: the resumed request fails, and so do its bounded retries
    hub.inject("GET", f"/resolve/.*/{SHARD}", "error", times=DOWNLOAD_ATTEMPTS)
    with pytest.raises(HubDownloadError, match="run the same call again"):
        load(hub, "alice/tiny-m1", tmp_path)
    assert not partial_files(tmp_path)
    blobs = tmp_path / "models--alice--tiny-blocks" / "blobs"
    sizes = sorted(p.stat().st_size for p in blobs.iterdir())
    assert len(sizes) == 2  # index and shard 1 completed; nothing of shard 2 is left behind
    hub.clear_faults()
    assert torch.equal(logits(load(hub, "alice/tiny-m1", tmp_path)), logits(models["m1"]))


def test_cached_shard_is_hashed_once_and_rechecked_when_it_changes(hub, pushed, tmp_path):
    from hf_dpdedup.errors import ChecksumMismatchError
    from hf_dpdedup.store.io import forget_verified

    load(hub, "alice/tiny-m1", tmp_path)
    markers = sorted(p.name for p in (tmp_path / "models--alice--tiny-blocks" / "hf_dpdedup-verified").iterdir())
    assert len(markers) == 2  # shards 1 and 2
    forget_verified()  # a new process: the marker is trusted while the blob is unchanged
    load(hub, "alice/tiny-m1", tmp_path, local_files_only=True)
    blob = (tmp_path / "models--alice--tiny-blocks" / "blobs" / markers[0])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.unlink()
    blob.write_bytes(bytes(data))  # damaged in the cache: new identity, so it is hashed again
    forget_verified()
    with pytest.raises(ChecksumMismatchError):
        load(hub, "alice/tiny-m1", tmp_path, local_files_only=True)
