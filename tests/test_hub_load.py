"""DedupedModel.from_pretrained from Hub repos, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch

from hf_dpdedup import DedupedModel, pipeline, push_family_to_hub
from hf_dpdedup.errors import HubOfflineError
from hf_dpdedup.hub.download import COMMIT_SHA

from hub_support import hub, load, logits, make_family, models  # noqa: F401

STORE_REPO = "alice/tiny-blocks"
NEEDS = {"m0": {"blocks-00001.safetensors"},
         "m1": {"blocks-00001.safetensors", "blocks-00002.safetensors"},
         "m2": {"blocks-00001.safetensors", "blocks-00003.safetensors"}}


@pytest.fixture(scope="module")
def family(models, tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("hubfam") / "tiny", models)


@pytest.fixture
def pushed(hub, family):
    result = push_family_to_hub(family, "alice", token="hf_write", endpoint=hub.url)
    hub.log.clear()
    return result


def test_every_member_loads_bit_identical_in_a_fresh_cache_fetching_only_its_shards(hub, pushed, models, tmp_path):
    for name, original in models.items():
        hub.log.clear()
        loaded = load(hub, f"alice/tiny-{name}", tmp_path / f"cache-{name}")
        assert type(loaded) is type(original)
        assert torch.equal(logits(loaded), logits(original))
        reference = original.state_dict()
        assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
        assert set(hub.fetched(STORE_REPO)) == {"block_store.json"} | NEEDS[name]  # partial download
        info = loaded.dedup_info
        assert (info.repo_id, info.store_repo_id, info.store_revision) == (
            f"alice/tiny-{name}", STORE_REPO, pushed.store.commit)
        assert COMMIT_SHA.match(info.store_revision) and info.epsilon == original_epsilon(name)


def original_epsilon(name: str) -> float:
    return float(2 ** int(name[1:]))


def test_second_member_reuses_the_cached_shards(hub, pushed, tmp_path):
    cache = tmp_path / "shared-cache"
    load(hub, "alice/tiny-m1", cache)
    hub.log.clear()
    load(hub, "alice/tiny-m2", cache)
    assert hub.fetched(STORE_REPO) == ["blocks-00003.safetensors"]  # shard 1 and the index: cached
    blobs = list((cache / "models--alice--tiny-blocks" / "blobs").iterdir())
    assert len(blobs) == 4  # index + three shards, each stored once


def test_offline_reload_from_the_cache_alone(hub, pushed, models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load(hub, "alice/tiny-m1", cache)
    hub.log.clear()
    again = load(hub, "alice/tiny-m1", cache, local_files_only=True)
    assert torch.equal(logits(again), logits(models["m1"]))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    offline = load(hub, "alice/tiny-m1", cache)
    assert torch.equal(logits(offline), logits(models["m1"]))
    assert hub.log == []  # not one request reached the server
    with pytest.raises(HubOfflineError, match="not in the local cache"):
        load(hub, "alice/tiny-m2", cache)  # its shard 3 was never downloaded


def test_old_member_commit_keeps_loading_what_it_was_pinned_to(hub, pushed, family, models, tmp_path):
    old_member_commit = pushed.members["m0"].commit
    # the same family with one more member: the store gets a new commit, members are re-pinned to it
    second = push_family_to_hub(family_plus(family, models["m0"], tmp_path), "alice", family_name="tiny",
                                token="hf_write", endpoint=hub.url)
    assert second.store.changed and second.store.commit != pushed.store.commit
    old = load(hub, "alice/tiny-m0", tmp_path / "c1", revision=old_member_commit)
    new = load(hub, "alice/tiny-m0", tmp_path / "c2")
    assert old.dedup_info.store_revision == pushed.store.commit
    assert new.dedup_info.store_revision == second.store.commit
    assert torch.equal(logits(old), logits(models["m0"])) and torch.equal(logits(new), logits(models["m0"]))


def _changed(model):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bert.encoder.layer[1].attention.self.query.weight.mul_(-1)
    return other


def family_plus(family, base, tmp_path):
    """A copy of ``family`` (same store id, rows and members) with one more member appended."""
    import shutil

    from hf_dpdedup import FamilyStore

    copy_root = tmp_path / "tiny-copy" / "tiny"
    shutil.copytree(family.root, copy_root)
    grown = FamilyStore.open(copy_root)
    grown.add_model("m3", _changed(base), privacy=None)
    return grown


def test_pipeline_from_a_repo_id_with_the_members_tokenizer(hub, pushed, models, tmp_path):
    classify = pipeline("text-classification", "alice/tiny-m2", endpoint=hub.url, cache_dir=tmp_path / "cache",
                        pipeline_kwargs={"top_k": None})
    scores = classify(["a very good film", "the plot is dull"])
    assert len(scores) == 2 and all(len(s) == 2 for s in scores)
    tokens = classify.tokenizer(["a very good film"], return_tensors="pt")
    with torch.no_grad():
        expected = models["m2"](**tokens).logits.softmax(-1)[0]
    got = {d["label"]: d["score"] for d in scores[0]}
    assert got["LABEL_1"] == pytest.approx(float(expected[1]), abs=1e-6)
