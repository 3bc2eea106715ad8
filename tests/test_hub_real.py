"""Opt-in: push a tiny family to the real Hugging Face Hub through Xet and load it back.

Skipped unless ``HF_DPDEDUP_HUB_TOKEN`` (a write token) and ``HF_DPDEDUP_HUB_NAMESPACE`` are set:
every other test stays on 127.0.0.1. The repos are created private under a unique family name and
deleted afterwards. It runs in a fresh process, because this test session has set
``HF_HUB_OFFLINE=1`` and ``HF_HUB_DISABLE_XET=1``, which huggingface_hub reads at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOKEN = os.environ.get("HF_DPDEDUP_HUB_TOKEN")
NAMESPACE = os.environ.get("HF_DPDEDUP_HUB_NAMESPACE")
HERE = Path(__file__).resolve().parent

SCRIPT = r'''
import sys, tempfile, uuid
from pathlib import Path
import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import is_xet_available
from conftest import example_inputs, tiny_model
from hf_dpdedup import DedupedModel, FamilyStore, push_family_to_hub

token, namespace = sys.argv[1], sys.argv[2]
assert is_xet_available(), "hf_xet must be installed and enabled for this test"
name = f"hf-dpdedup-test-{uuid.uuid4().hex[:8]}"
api = HfApi(token=token)
with tempfile.TemporaryDirectory() as tmp:
    family = FamilyStore.create(Path(tmp) / name, block_size=256)
    model = tiny_model("bert", seed=0)
    family.add_model("m0", model)
    result = push_family_to_hub(family, namespace, token=token, private=True)
    try:
        tree = {f.path: f for f in api.list_repo_tree(result.store.repo_id, recursive=True)}
        assert all(tree[s.file].lfs is not None for s in family.blocks.index.shards)  # large files: Xet/LFS
        assert push_family_to_hub(family, namespace, token=token).commits_made == 0
        loaded = DedupedModel.from_pretrained(result.members["m0"].repo_id, token=token,
                                              cache_dir=Path(tmp) / "cache")
        with torch.no_grad():
            inputs = example_inputs("bert")
            assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    finally:
        for repo in [result.store.repo_id, *(m.repo_id for m in result.members.values())]:
            api.delete_repo(repo, missing_ok=True)
print("ok")
'''


@pytest.mark.skipif(not (TOKEN and NAMESPACE), reason="set HF_DPDEDUP_HUB_TOKEN and HF_DPDEDUP_HUB_NAMESPACE "
                    "to run against the real Hub")
def test_push_and_load_through_the_real_hub_with_xet(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET")}
    env.update({"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache"),
                "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])})
    run = subprocess.run([sys.executable, "-c", SCRIPT, TOKEN, NAMESPACE], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-4000:]
