"""Hub conformance against the local server with the real client: the git-LFS upload path, repo
names and collisions, transient faults retried, card metadata refused, tags, gated repos."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from hf_dpdedup import DedupedModel, push_family_to_hub
from hf_dpdedup.errors import (
    HubAuthError,
    HubDownloadError,
    HubRepoNotFoundError,
    PushError,
    RepoCollisionError,
    RepoNameError,
)
from hf_dpdedup.hub import retry
from hf_dpdedup.hub.download import DOWNLOAD_ATTEMPTS

from hub_support import hub, load, logits, make_family, models  # noqa: F401

STORE = "alice/tiny-blocks"


@pytest.fixture
def family(models, tmp_path):
    return make_family(tmp_path / "tiny", models)


@pytest.fixture
def fast_retries(monkeypatch):
    """Backoff of 10 ms instead of 1 s (a Retry-After the server sends is still honoured)."""
    monkeypatch.setattr(retry, "BASE_DELAY", 0.01)


def push(hub, family, **kwargs):
    return push_family_to_hub(family, "alice", token=kwargs.pop("token", "hf_write"), endpoint=hub.url, **kwargs)


def other_family(models, root):
    """A family of another block store whose members have the same names."""
    changed = {}
    for name, model in models.items():
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.classifier.weight.mul_(-1)
        changed[name] = m
    return make_family(root, changed)


# --- the git-LFS path -----------------------------------------------------------------------------
def test_push_and_pull_go_through_git_lfs(hub, family, models, tmp_path):
    push(hub, family)
    shards = {s.file: s.sha256 for s in family.blocks.index.shards}
    assert hub.lfs_files(STORE) == shards  # every shard went through LFS, addressed by its sha256
    assert "extras.safetensors" in hub.lfs_files("alice/tiny-m1")
    posts = [p for m, p in hub.log if m == "POST"]
    assert any(p.endswith(".git/info/lfs/objects/batch") for p in posts)
    assert any(p.endswith(".git/info/lfs/objects/verify") for p in posts)
    # shards + each distinct extras file once (LFS is content-addressed; with biases and norms packed
    # into rows, the members' extras files hold no tensor and are the same bytes)
    extras = {family.constitution(name).extras_sha256 for name in family.members()}
    assert sum(m == "PUT" for m, _ in hub.log) == len(shards) + len(extras)
    tree = {f.path: f for f in HfApi(endpoint=hub.url).list_repo_tree(STORE, recursive=True)
            if isinstance(f, RepoFile)}
    assert all(tree[f].lfs is not None and tree[f].lfs.sha256 == sha for f, sha in shards.items())
    assert tree["block_store.json"].lfs is None  # small text files stay regular

    cache = tmp_path / "cache"
    loaded = load(hub, "alice/tiny-m1", cache)
    assert torch.equal(logits(loaded), logits(models["m1"]))
    blobs = {p.name for p in (cache / "models--alice--tiny-blocks" / "blobs").iterdir()}
    assert {shards["blocks-00001.safetensors"], shards["blocks-00002.safetensors"]} <= blobs  # X-Linked-Etag

    hub.log.clear()
    assert push(hub, family).commits_made == 0  # LFS files compared by sha256: nothing re-sent
    assert not any(m == "PUT" for m, _ in hub.log)


def test_growing_family_uploads_only_the_new_shard(hub, family, models):
    push(hub, family)
    extra = copy.deepcopy(models["m0"])
    with torch.no_grad():
        extra.bert.encoder.layer[1].output.dense.weight.mul_(-1)
    family.add_model("m3", extra)
    hub.log.clear()
    push(hub, family)
    puts = [p for m, p in hub.log if m == "PUT"]
    new = family.blocks.index.shards[-1]
    assert f"/lfs-upload/{new.sha256}" in puts
    assert not any(s.sha256 in p for s in family.blocks.index.shards[:-1] for p in puts)


# --- names and collisions -------------------------------------------------------------------------
def test_member_repos_are_named_after_the_family(hub, family):
    result = push(hub, family)
    assert {m.repo_id for m in result.members.values()} == {"alice/tiny-m0", "alice/tiny-m1", "alice/tiny-m2"}
    other = push(hub, family, family_name="second")
    assert other.members["m0"].repo_id == "alice/second-m0" and other.store.repo_id == "alice/second-blocks"


def test_pushing_another_family_into_the_same_repos_is_refused(hub, family, models, tmp_path):
    first = push(hub, family)
    second = other_family(models, tmp_path / "elsewhere" / "tiny")
    heads = {r: hub.head(r) for r in hub.repos}
    with pytest.raises(RepoCollisionError, match="belongs to block store.*force=True") as err:
        push(hub, second)  # same family name "tiny": same repo names, another store
    assert STORE in str(err.value) and family.blocks.store_id in str(err.value)
    assert {r: hub.head(r) for r in hub.repos} == heads  # nothing was repointed
    forced = push(hub, second, force=True)
    assert forced.store.changed and forced.members["m0"].changed
    now = load(hub, "alice/tiny-m0", tmp_path / "c1")
    assert torch.equal(logits(now), logits(DedupedModel.from_pretrained(second.member_path("m0"))))
    # the old member commit still loads the first family's model from the store commit it pinned
    old = load(hub, "alice/tiny-m0", tmp_path / "c2", revision=first.members["m0"].commit)
    assert torch.equal(logits(old), logits(models["m0"]))


def test_a_plain_model_repo_is_not_taken_over(hub, family):
    api = HfApi(endpoint=hub.url, token="hf_write")
    api.create_repo("alice/tiny-m1")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/tiny-m1")
    with pytest.raises(RepoCollisionError, match="did not push"):
        push(hub, family)


@pytest.mark.parametrize("kwargs", [{"namespace": "bad--ns"}, {"family_name": "x" * 90}])
def test_invalid_repo_names_are_refused_before_any_request(hub, family, kwargs):
    namespace = kwargs.pop("namespace", "alice")
    with pytest.raises(RepoNameError, match="not a valid Hub repo id"):
        push_family_to_hub(family, namespace, token="hf_write", endpoint=hub.url, **kwargs)
    assert hub.log == []


# --- faults ---------------------------------------------------------------------------------------
def test_rate_limited_commit_is_retried_after_retry_after(hub, family):
    hub.inject("POST", r"/api/models/alice/tiny-m1/commit/", status=429, headers={"Retry-After": "1"})
    start = time.monotonic()
    result = push(hub, family)
    assert time.monotonic() - start >= 1.0
    assert result.members["m1"].changed and hub.commit_count("alice/tiny-m1") == 2
    assert [p for _, p in hub.log].count("/api/models/alice/tiny-m1/commit/main") == 2


def test_server_error_on_create_repo_and_commit_is_retried(hub, family, fast_retries):
    hub.inject("POST", r"^/api/repos/create$", status=500)
    hub.inject("POST", r"/api/models/alice/tiny-blocks/commit/", status=503)
    result = push(hub, family)
    assert result.commits_made == 4


def test_a_commit_that_keeps_failing_is_a_push_error(hub, family, fast_retries):
    hub.inject("POST", r"/api/models/alice/tiny-m0/commit/", status=500, times=retry.MAX_ATTEMPTS)
    with pytest.raises(PushError, match="(?s)HTTP 500.*Run the same push again"):
        push(hub, family)
    assert push(hub, family).members["m0"].changed  # the fault is gone: the push resumes


def test_a_commit_applied_whose_answer_was_a_500_is_not_made_twice(hub, family, fast_retries):
    hub.inject("POST", r"/api/models/alice/tiny-m2/commit/", "cut")  # applied, answer lost
    with pytest.raises(PushError):
        push(hub, family)
    before = hub.commit_count("alice/tiny-m2")
    assert not push(hub, family).members["m2"].changed and hub.commit_count("alice/tiny-m2") == before


def test_shard_download_5xx_is_retried_then_typed(hub, family, models, tmp_path, fast_retries):
    push(hub, family)
    shard = "blocks-00002.safetensors"
    hub.inject("GET", f"/resolve/.*/{shard}", status=502)
    loaded = load(hub, "alice/tiny-m1", tmp_path / "a")
    assert torch.equal(logits(loaded), logits(models["m1"]))
    assert hub.fetched(STORE).count(shard) == 2
    hub.inject("GET", f"/resolve/.*/{shard}", status=500, times=DOWNLOAD_ATTEMPTS)
    with pytest.raises(HubDownloadError, match="HTTP 500"):
        load(hub, "alice/tiny-m1", tmp_path / "b")


def test_card_metadata_rejected_by_the_hub_names_the_field(hub, family):
    with pytest.raises(PushError, match="'base_model'.*--base-model") as err:
        push(hub, family, base_model="not a model id!")
    assert err.value.__cause__ is None and "Traceback" not in str(err.value)
    assert hub.commit_count("alice/tiny-m0") == 1  # only the initial commit: nothing was written


def test_retry_after_as_an_http_date():
    import email.utils

    import httpx2

    from huggingface_hub.errors import HfHubHTTPError

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    response = httpx2.Response(503, headers={"Retry-After": when}, request=httpx2.Request("POST", "http://x"))
    assert 25 <= retry.retry_after(HfHubHTTPError("busy", response=response)) <= 31


# --- tags and gated repos -------------------------------------------------------------------------
def test_a_tag_keeps_loading_what_it_tagged(hub, family, models, tmp_path):
    first = push(hub, family)
    api = HfApi(endpoint=hub.url, token="hf_write")
    api.create_tag("alice/tiny-m0", tag="v1")
    extra = copy.deepcopy(models["m0"])
    with torch.no_grad():
        extra.bert.encoder.layer[0].output.dense.weight.mul_(-1)
    family.add_model("m3", extra)
    second = push(hub, family)
    assert second.store.commit != first.store.commit
    tagged = load(hub, "alice/tiny-m0", tmp_path / "c", revision="v1")
    assert tagged.dedup_info.store_revision == first.store.commit
    assert torch.equal(logits(tagged), logits(models["m0"]))
    assert [t.name for t in api.list_repo_refs("alice/tiny-m0").tags] == ["v1"]
    with pytest.raises(HubRepoNotFoundError, match="check the revision"):
        load(hub, "alice/tiny-m0", tmp_path / "d", revision="v2")
    api.delete_tag("alice/tiny-m0", tag="v1")
    with pytest.raises(HubRepoNotFoundError):
        load(hub, "alice/tiny-m0", tmp_path / "e", revision="v1")


def test_gated_member_needs_granted_access(hub, family, models, tmp_path):
    push(hub, family)
    HfApi(endpoint=hub.url, token="hf_write").update_repo_settings("alice/tiny-m0", gated="auto")
    assert HfApi(endpoint=hub.url).model_info("alice/tiny-m0").gated == "auto"
    with pytest.raises(HubAuthError, match="gated: request access"):
        load(hub, "alice/tiny-m0", tmp_path / "a", token="hf_bob")
    hub.grant("alice/tiny-m0", "bob")
    granted = load(hub, "alice/tiny-m0", tmp_path / "b", token="hf_bob")
    assert torch.equal(logits(granted), logits(models["m0"]))
    owner = load(hub, "alice/tiny-m0", tmp_path / "c", token="hf_write")
    assert owner.dedup_info.name == "m0"
