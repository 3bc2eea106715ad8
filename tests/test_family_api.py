"""DedupedFamily: deduplicate → save_pretrained → push_to_hub → from_pretrained, the same family as
the one-pass deduplicate_family, and the README's Python example run as it is written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from hf_dpdedup import (DedupConfig, DedupData, DedupedFamily, DedupedModel, Greedy, Member, PrivacyMetadata,
                        classification_score)
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.errors import StoreFormatError
from hf_dpdedup.testing import HubServer

from hub_support import hub  # noqa: F401 (fixture)
from test_dedup_engine import BLOCK, make_family

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIG = DedupConfig(block_size=BLOCK, threshold=0.03, strategy=Greedy(n=8))


def _data(batches):
    return DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])


def _shards(root: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "block_store").glob("*.safetensors"))]


def _lazy(members, root: Path) -> list[Member]:
    out = []
    for m in members:
        m.model.save_pretrained(root / m.name)
        out.append(Member.from_folder(root / m.name, m.privacy,
                                      lambda f=root / m.name: BertForSequenceClassification.from_pretrained(f).eval()))
    return out


@pytest.mark.parametrize("lazy", [False, True])
def test_the_family_object_saves_what_the_one_pass_run_stores(tmp_path, lazy):
    members, batches = make_family()
    one_pass = deduplicate_family(make_family()[0], _data(batches), CONFIG, tmp_path / "one-pass")
    if lazy:
        members = _lazy(members, tmp_path / "models")
    family = DedupedFamily.deduplicate(members, _data(batches), CONFIG)
    assert family.members == {} and family.store is None  # computed, nothing written
    assert [m.name for m in family.report.models] == [m.name for m in one_pass.models]
    family.save_pretrained(tmp_path / "family")
    assert _shards(tmp_path / "family") == _shards(tmp_path / "one-pass")
    for a, b in zip(one_pass.models, family.report.models):
        assert (a.from_base, a.own_bytes, a.compression) == (b.from_base, b.own_bytes, b.compression)
        assert [c.to_dict() for c in a.charges] == [c.to_dict() for c in b.charges]
    for name in family.members:
        a = (tmp_path / "one-pass" / "members" / name / "dedup_constitution.json").read_text()
        b = (tmp_path / "family" / "members" / name / "dedup_constitution.json").read_text()
        assert json.loads(a)["tensors"] == json.loads(b)["tensors"]
        assert json.loads(a)["dedup"] == json.loads(b)["dedup"]
    if lazy:
        assert all(m.model is None for m in members)  # rebuilt from decisions for saving, then let go
    opened = DedupedFamily.from_pretrained(tmp_path / "family")
    assert sorted(opened.members) == sorted(m.name for m in one_pass.models)
    assert opened.report["summary"]["family_stored_bytes"] == family.report.family_stored_bytes
    assert DedupConfig.from_family(tmp_path / "family") == CONFIG
    reference = DedupedModel.from_pretrained(tmp_path / "one-pass" / "members" / "eps8")
    loaded = opened.model("eps8")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_save_refuses_a_used_folder_and_leaves_it_as_it_was(tmp_path):
    members, batches = make_family()
    family = DedupedFamily.deduplicate(members, _data(batches), CONFIG)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(StoreFormatError, match="not empty"):
        family.save_pretrained(tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging folder left behind
    with pytest.raises(StoreFormatError, match="neither a family folder"):
        DedupedFamily.from_pretrained(tmp_path / "taken")


def test_push_to_hub_and_open_the_family_by_name(hub, tmp_path):  # noqa: F811
    hub.tokens["hf_org"] = ("my-org", "write")
    members, batches = make_family()
    family = DedupedFamily.deduplicate(members, _data(batches), CONFIG)
    with pytest.raises(StoreFormatError, match="family_name"):
        family.push_to_hub("my-org", token="hf_org", endpoint=hub.url)  # unsaved: no folder name to use
    result = family.push_to_hub("my-org", family_name="toy", token="hf_org", endpoint=hub.url)
    assert sorted(result.members) == ["eps1", "eps2", "eps8"]
    opened = DedupedFamily.from_pretrained("my-org/toy", endpoint=hub.url, token="hf_org")
    assert opened.members == {n: f"my-org/toy-{n}" for n in ("eps1", "eps2", "eps8")}
    model = opened.model("eps2", cache_dir=tmp_path / "cache")
    expected = {k: v for k, v in members[1].model.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


PRELUDE = '''
import sys, torch
sys.path[:0] = {paths!r}
from conftest import tiny_model
g = torch.Generator().manual_seed(1)
teacher = tiny_model("bert", seed=0)
ids = torch.randint(3, 120, (600, 12), generator=g)
with torch.no_grad():
    labels = teacher(input_ids=ids).logits.argmax(-1)
runs = []
for e, noise in ((1.0, 0.6), (2.0, 0.25), (4.0, 0.0)):
    m = tiny_model("bert", seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    runs.append((e, m))
batches = [{{"input_ids": ids[i : i + 100], "labels": labels[i : i + 100]}} for i in range(0, 600, 100)]
val_batches, test_batches = batches[:3], batches[3:]
'''


def test_the_readme_python_example_runs_as_written(tmp_path):
    block = re.search(r"From Python:\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    script = PRELUDE.format(paths=[str(Path(__file__).parent)]) + block
    with HubServer(tokens={"hf_org": ("my-org", "write")}) as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": "hf_org", "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "family" / "dedup_config.json").is_file()
    assert "eps4" in done.stdout  # the report table, then ε after deduplication
    assert re.search(r"^\d+(\.\d+)?$", done.stdout.strip().splitlines()[-1])
