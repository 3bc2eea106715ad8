"""A member pushed by the CLI loads with plain transformers (``trust_remote_code=True``), with and
without hf_dpdedup installed, bit-identical to ``DedupedModel.from_pretrained``.

Each check runs in a fresh process whose ``HF_ENDPOINT`` is the local Hub (huggingface_hub reads it
once, at import): transformers resolves, downloads and runs the member repo's remote code exactly as
it does against the real Hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_dpdedup import DedupedModel
from hf_dpdedup.cli import main
from hf_dpdedup.hub.remote import REMOTE_CODE_FILE

from hub_support import hub, make_family, models  # noqa: F401

HERE = Path(__file__).resolve().parent
REPO = "alice/tiny-m2"


@pytest.fixture
def pushed(hub, models, tmp_path):
    family = make_family(tmp_path / "tiny", models)
    assert main(["push", str(family.root), "alice", "--token", "hf_write", "--endpoint", hub.url]) == 0
    return family


def as_a_transformers_user(hub, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "result.pt"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "user-cache"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_TOKEN": "hf_read", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(HERE / "transformers_user.py"), REPO, str(out), *flags],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out, weights_only=False)


def reference(hub, tmp_path):
    return DedupedModel.from_pretrained(REPO, endpoint=hub.url, cache_dir=tmp_path / "ref-cache")


def check_identical(got: dict, expected) -> None:
    assert got["class"] == type(expected).__name__ == "BertForSequenceClassification"
    ref = expected.state_dict()
    assert got["state_dict"].keys() == ref.keys()
    assert all(torch.equal(got["state_dict"][k], ref[k]) for k in ref)  # bit-identical weights
    info = expected.dedup_info
    assert got["dedup_info"] == {"name": "m2", "repo_id": REPO, "store_repo_id": info.store_repo_id,
                                 "store_revision": info.store_revision, "epsilon": info.epsilon}
    assert got["pipeline_task"] == "text-classification" and got["pipeline_equal"]
    assert len(got["scores"]) == 2 and all(len(s) == 2 for s in got["scores"])


def test_member_repo_ships_auto_map_and_remote_code(hub, pushed):
    commit = hub.repos[REPO].resolve("main")
    config = json.loads(hub.blobs[commit.files["config.json"]])
    assert config["auto_map"] == {"AutoModelForSequenceClassification": "modeling_hf_dpdedup.DedupedMember"}
    assert REMOTE_CODE_FILE in commit.files
    readme = hub.blobs[commit.files["README.md"]].decode()
    body = readme.split("\n---\n", 1)[1].lstrip().splitlines()
    assert "hf_dpdedup.DedupedModel.from_pretrained" in body[2]
    assert "trust_remote_code=True" in body[3] and "no hf_dpdedup needed" in body[3]


def test_plain_transformers_without_hf_dpdedup(hub, pushed, tmp_path):
    got = as_a_transformers_user(hub, tmp_path, "--without-hf-dpdedup")
    assert got["hf_dpdedup_loaded"] is False
    check_identical(got, reference(hub, tmp_path))
    assert "block_store.json" in hub.fetched("alice/tiny-blocks")


def test_plain_transformers_with_hf_dpdedup_installed(hub, pushed, tmp_path):
    got = as_a_transformers_user(hub, tmp_path)
    assert got["hf_dpdedup_loaded"] is True
    check_identical(got, reference(hub, tmp_path))


def remote_module():
    import importlib.util

    from hf_dpdedup.hub.remote import REMOTE_CODE

    spec = importlib.util.spec_from_file_location("modeling_hf_dpdedup_under_test", REMOTE_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remote_code_rebuilds_a_local_family_member_by_itself(models, tmp_path):
    """The standalone path (what runs without hf_dpdedup) on a local member folder: the store is
    the folder its constitution's relative path names."""
    family = make_family(tmp_path / "tiny", models)
    loaded = remote_module().load_member(str(family.member_path("m1")))
    expected = DedupedModel.from_pretrained(family.member_path("m1")).state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert loaded.dedup_info.name == "m1" and loaded.dedup_info.repo_id is None


def test_remote_code_refuses_a_damaged_shard(models, tmp_path):
    family = make_family(tmp_path / "tiny", models)
    shard = family.blocks.path / family.blocks.index.shards[-1].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match="sha256"):
        remote_module().load_member(str(family.member_path("m2")))
