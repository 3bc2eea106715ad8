"""Hub faults of the store's fault corpus (issue 17): a corrupt blob evicted from the cache, a
downloaded member that names a local store path, and a Hub error that is not offline mode. Local
Hub server, real huggingface_hub client."""

from __future__ import annotations

import json
import re

import pytest
import torch
from huggingface_hub import HfApi

from hf_dpdedup import push_family_to_hub
from hf_dpdedup.errors import HubChecksumError, HubDownloadError, HubOfflineError

from hub_support import hub, load, logits, make_family, models  # noqa: F401

SHARD = "blocks-00002.safetensors"  # m1's own shard


@pytest.fixture(scope="module")
def family(models, tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("hubfaults") / "tiny", models)


@pytest.fixture
def pushed(hub, family):
    return push_family_to_hub(family, "alice", token="hf_write", endpoint=hub.url)


def test_b13_corrupt_blob_is_evicted_so_a_plain_retry_recovers(hub, pushed, models, tmp_path):
    store_repo = pushed.store.repo_id
    good = hub.blobs[hub.repos[store_repo].resolve("main").files[SHARD]]
    hub.tamper(store_repo, SHARD, good[:-4] + b"\0\0\0\1")
    with pytest.raises(HubChecksumError, match="removed from the cache"):
        load(hub, pushed.members["m1"].repo_id, tmp_path)
    hub.tamper(store_repo, SHARD, good)  # repaired upstream
    loaded = load(hub, pushed.members["m1"].repo_id, tmp_path)  # no force_download needed
    assert torch.equal(logits(loaded), logits(models["m1"]))


def test_b14_downloaded_member_never_reads_a_local_store_path(hub, pushed, models, tmp_path):
    """A Hub constitution that names ``block_store.path`` (here, a folder planted beside the cache)
    must still load its blocks from the pinned store commit, never from that folder."""
    member = pushed.members["m1"].repo_id
    commit = hub.repos[member].resolve("main")
    constitution = json.loads(hub.blobs[commit.files["dedup_constitution.json"]])
    constitution["block_store"]["path"] = "../../../planted-store"
    api = HfApi(endpoint=hub.url, token="hf_write")
    api.create_repo("alice/planted")
    for name, oid in commit.files.items():
        data = json.dumps(constitution).encode() if name == "dedup_constitution.json" else hub.blobs[oid]
        api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id="alice/planted")
    planted = tmp_path / "planted-store"  # where ../../../ leads from the member's snapshot folder
    planted.mkdir()
    (planted / "block_store.json").write_text('{"planted": true}')
    loaded = load(hub, "alice/planted", tmp_path)
    assert torch.equal(logits(loaded), logits(models["m1"]))
    assert loaded.dedup_info.store_repo_id == pushed.store.repo_id
    assert "planted-store" not in loaded.dedup_info.store_path


def test_b16_hub_500_on_repo_info_is_not_offline_mode(hub, pushed, tmp_path):
    repo_id = pushed.members["m1"].repo_id
    hub.inject("GET", rf"^/api/models/{re.escape(repo_id)}", "error", status=500, times=100)
    with pytest.raises(HubDownloadError, match="run the same call again") as excinfo:
        load(hub, repo_id, tmp_path)
    assert not isinstance(excinfo.value, HubOfflineError)
    assert "HF_HUB_OFFLINE" not in str(excinfo.value)


def test_verification_marker_survives_blobs_behind_links(hub, pushed, models, tmp_path):
    """huggingface_hub with Xet keeps blobs in a shared store behind links: the marker of a verified
    blob is still found (a new process does not hash it again) and still tied to the bytes."""
    import os

    from hf_dpdedup.errors import ChecksumMismatchError
    from hf_dpdedup.store.io import forget_verified

    member = pushed.members["m1"].repo_id
    load(hub, member, tmp_path)
    repo = tmp_path / "models--alice--tiny-blocks"
    shared = tmp_path / "xet-store"
    shared.mkdir()
    for blob in (repo / "blobs").iterdir():  # the Xet layout: blobs/<etag> -> shared store
        target = shared / blob.name
        blob.rename(target)
        blob.symlink_to(target)
    markers = repo / "hf_dpdedup-verified"
    for marker in markers.iterdir():
        marker.unlink()
    forget_verified()
    load(hub, member, tmp_path, local_files_only=True)  # verifies and writes markers
    written = {m.name: m.stat().st_mtime_ns for m in markers.iterdir()}
    assert len(written) == 2  # shards 1 and 2, named after their blobs
    forget_verified()  # a new process
    loaded = load(hub, member, tmp_path, local_files_only=True)
    assert {m.name: m.stat().st_mtime_ns for m in markers.iterdir()} == written  # trusted, not redone
    assert torch.equal(logits(loaded), logits(models["m1"]))
    victim = shared / next(iter(written))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))  # damaged in the shared store, in place
    forget_verified()
    with pytest.raises(ChecksumMismatchError):
        load(hub, member, tmp_path, local_files_only=True)
    assert not os.path.exists(victim)  # evicted: the next online load downloads it again
