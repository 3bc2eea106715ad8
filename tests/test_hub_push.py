"""push_family_to_hub / `hf-dpdedup push`: pinning, idempotence, resuming, permissions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_dpdedup import DedupedModel, FamilyStore, push_family_to_hub
from hf_dpdedup.cli import main
from hf_dpdedup.errors import HubAuthError, PushError

from hub_support import hub, logits, make_family, models  # noqa: F401

REPOS = ("alice/tiny-blocks", "alice/tiny-m0", "alice/tiny-m1", "alice/tiny-m2")


@pytest.fixture
def family(models, tmp_path):
    return make_family(tmp_path / "tiny", models)


def push(hub, family, **kwargs):
    return push_family_to_hub(family, "alice", token=kwargs.pop("token", "hf_write"), endpoint=hub.url, **kwargs)


def counts(hub):
    return {r: hub.commit_count(r) for r in REPOS if r in hub.repos}


def remote_constitution(hub, repo_id):
    commit = hub.repos[repo_id].resolve("main")
    return json.loads(hub.blobs[commit.files["dedup_constitution.json"]])


def grow(family, models):
    """Append a member with new rows (the store gets a new shard)."""
    import copy

    extra = copy.deepcopy(models["m0"])
    with torch.no_grad():
        extra.bert.encoder.layer[1].output.dense.weight.mul_(-1)
    family.add_model("m3", extra)
    return extra


def test_store_first_then_members_pinned_to_its_commit_sha(hub, family):
    result = push(hub, family)
    assert result.commits_made == 4
    assert [p for _, p in hub.log if "/commit/" in p][0] == "/api/models/alice/tiny-blocks/commit/main"
    for name in ("m0", "m1", "m2"):
        ref = remote_constitution(hub, f"alice/tiny-{name}")["block_store"]
        assert ref == {"store_id": family.blocks.store_id, "path": None, "repo_id": "alice/tiny-blocks",
                       "revision": hub.head("alice/tiny-blocks")}
    # the local family is untouched: its constitutions still point at the local store folder
    assert family.constitution("m0").block_store.path is not None


def test_repushing_an_unchanged_family_makes_no_commit(hub, family):
    push(hub, family)
    before = counts(hub)
    hub.log.clear()
    again = push(hub, family)
    assert again.commits_made == 0 and counts(hub) == before
    assert not any("/commit/" in p or "/preupload/" in p for _, p in hub.log)


def test_failed_push_keeps_every_repo_loadable_and_resumes(hub, family, models, tmp_path):
    first = push(hub, family)
    grow(family, models)
    hub.inject("POST", r"/api/models/alice/tiny-m1/commit/", "drop")
    with pytest.raises(PushError, match="Run the same push again") as err:
        push(hub, family)
    assert "alice/tiny-blocks" in str(err.value)  # says what is already up to date
    # m1 still holds its previous commit, pinned to the previous store commit, and loads
    assert hub.head("alice/tiny-m1") == first.members["m1"].commit
    old = DedupedModel.from_pretrained("alice/tiny-m1", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert old.dedup_info.store_revision == first.store.commit
    assert torch.equal(logits(old), logits(models["m1"]))
    store_head, m0_head = hub.head("alice/tiny-blocks"), hub.head("alice/tiny-m0")
    resumed = push(hub, family)
    assert not resumed.store.changed and not resumed.members["m0"].changed  # already done: skipped
    assert resumed.members["m1"].changed and resumed.members["m3"].changed
    assert (hub.head("alice/tiny-blocks"), hub.head("alice/tiny-m0")) == (store_head, m0_head)
    assert remote_constitution(hub, "alice/tiny-m1")["block_store"]["revision"] == store_head


def test_commit_applied_but_answer_lost_is_not_committed_twice(hub, family):
    hub.inject("POST", r"/api/models/alice/tiny-m0/commit/", "cut")
    with pytest.raises(PushError):
        push(hub, family)
    before = counts(hub)
    push(hub, family)
    assert counts(hub)["alice/tiny-m0"] == before["alice/tiny-m0"]  # the lost commit was there: nothing re-sent


def test_token_without_write_access_is_refused_with_a_next_step(hub, family):
    with pytest.raises(HubAuthError, match="write"):
        push(hub, family, token="hf_read")
    with pytest.raises(HubAuthError, match="alice"):
        push(hub, family, token="hf_bob")  # bob may write only to his own namespace
    assert hub.repos == {}


def test_private_family_needs_a_token_to_load(hub, family, tmp_path):
    from hf_dpdedup.errors import HubRepoNotFoundError

    push(hub, family, private=True)
    with pytest.raises(HubRepoNotFoundError, match="token"):
        DedupedModel.from_pretrained("alice/tiny-m0", endpoint=hub.url, cache_dir=tmp_path / "a", token=False)
    loaded = DedupedModel.from_pretrained("alice/tiny-m0", endpoint=hub.url, cache_dir=tmp_path / "b", token="hf_read")
    assert loaded.dedup_info.repo_id == "alice/tiny-m0"


def test_cli_push(hub, family, capsys):
    code = main(["push", str(family.root), "alice", "--family-name", "cli", "--token", "hf_write",
                 "--endpoint", hub.url, "--base-model", "google-bert/bert-base-uncased"])
    out = capsys.readouterr().out
    assert code == 0 and "alice/cli-blocks" in out and "alice/cli-m2" in out
    assert main(["push", str(family.root), "alice", "--family-name", "cli", "--token", "hf_read",
                 "--endpoint", hub.url]) == 2
    assert "HubAuthError" in capsys.readouterr().err


def test_push_of_a_copied_family_folder_keeps_the_store_id(hub, family, tmp_path):
    """A family folder moved elsewhere pushes to the same repos without changes (ids, not paths)."""
    push(hub, family)
    moved = tmp_path / "moved" / "tiny"
    shutil.copytree(family.root, moved)
    assert push(hub, FamilyStore.open(moved)).commits_made == 0


def test_a_family_from_the_dedup_engine_pushes_with_its_privacy_record(hub, tmp_path):
    """The engine's record (after-dedup cost as the constitution's privacy, the trained budget and the
    ledger in ``dedup``) reaches the card, and the member loads from the Hub as it does locally."""
    from huggingface_hub import ModelCard

    from conftest import tiny_model
    from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member
    from hf_dpdedup.dedup.storing import deduplicate_family
    from hf_dpdedup.dedup.tasks import classification_score
    from hf_dpdedup.privacy import PrivacyMetadata

    g = torch.Generator().manual_seed(0)
    members = []
    for eps, noise in ((1.0, 0.02), (8.0, 0.0)):
        m = tiny_model("bert", seed=0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
        members.append(Member(f"eps{eps:g}", m, PrivacyMetadata(eps, 1e-5, ("toy",))))
    ids = torch.randint(3, 120, (200, 8), generator=g)
    with torch.no_grad():
        labels = members[1].model(input_ids=ids).logits.argmax(-1)
    batches = [{"input_ids": ids[i:i + 50], "labels": labels[i:i + 50]} for i in range(0, 200, 50)]
    data = DedupData(classification_score, public_val=batches[:2], public_test=batches[2:])
    deduplicate_family(members, data, DedupConfig(block_size=128, threshold=0.05, strategy="binary"),
                       tmp_path / "engine")
    family = FamilyStore.open(tmp_path / "engine")
    push(hub, family)
    loaded = DedupedModel.from_pretrained("alice/engine-eps8", endpoint=hub.url, cache_dir=tmp_path / "c")
    local = DedupedModel.from_pretrained(family.member_path("eps8"))
    assert torch.equal(logits(loaded), logits(local))
    card = ModelCard.load(Path(loaded.dedup_info.member_path) / "README.md")
    privacy = card.data.to_dict()["hf_dpdedup"]["privacy"]
    assert privacy["original"]["epsilon"] == 8.0
    assert privacy["after_dedup"]["loose"]["epsilon"] == loaded.dedup_info.epsilon >= 8.0


def test_seeded_members_are_refused_unless_allowed_and_their_cards_say_so(hub, models, tmp_path):
    """Issue 13 (major 3): a member whose noise came from a known seed is not published by default."""
    from hf_dpdedup.errors import SeededPushError
    from hf_dpdedup.privacy import PrivacyMetadata

    family = make_family(tmp_path / "tiny", models)
    family.add_model("m1", models["m1"], privacy=PrivacyMetadata(2.0, 1e-5, ("private-reviews",), seeded=True))
    with pytest.raises(SeededPushError, match="allow_seeded"):
        push(hub, family)
    assert not hub.repos.get("alice/tiny-m1")
    push(hub, family, allow_seeded=True)
    card = hub.blobs[hub.repos["alice/tiny-m1"].resolve("main").files["README.md"]].decode()
    assert "not a privacy guarantee" in card and "seeded: true" in card
    clean = hub.blobs[hub.repos["alice/tiny-m0"].resolve("main").files["README.md"]].decode()
    assert "not a privacy guarantee" not in clean
    loaded = DedupedModel.from_pretrained("alice/tiny-m1", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert loaded.dedup_info.seeded and "not a privacy guarantee" in loaded.dedup_info.noise
