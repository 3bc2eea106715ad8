"""Shared pieces of the Hub tests: a local Hub-compatible server and a tiny three-member family.

conftest sets ``HF_HUB_OFFLINE=1`` so that no test can reach a real Hub, and ``HF_HUB_DISABLE_XET=1``
so that the real client uploads large files through git LFS, which the local server implements. huggingface_hub reads it
once, at import, into ``huggingface_hub.constants``; the ``hub`` fixture turns it off for the test's
duration only; every call passes ``endpoint=`` (a server on 127.0.0.1) and ``cache_dir=``, and the
default cache is a temporary folder. (``constants.ENDPOINT`` is deliberately *not* patched:
``hf_hub_url`` swaps in ``endpoint=`` only for URLs that start with it, so patching it would send
downloads to the default Hub.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import example_inputs, tiny_model
from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.testing import HubServer
from hf_dpdedup.privacy import PrivacyMetadata

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TOKENS = {"hf_write": ("alice", "write"), "hf_read": ("alice", "read"), "hf_bob": ("bob", "write")}
BLOCK = 256
WORDS = ["good", "bad", "film", "great", "awful", "plot", "fun", "dull", "a", "the", "is", "very"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubServer(tokens=TOKENS) as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert constants.HF_HUB_DISABLE_XET, "conftest sets HF_HUB_DISABLE_XET=1 before huggingface_hub is imported"
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default-cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_read")  # never a real token, even if one is saved
        yield server


def tiny_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def family_models() -> dict[str, torch.nn.Module]:
    """m0; m1 = m0 with encoder layer 1 changed; m2 = m0 with layer 0 changed. Added in this order,
    each member's new rows land in a shard of their own: m0 needs shard 1, m1 shards 1+2, m2 1+3."""
    m0 = tiny_model("bert", seed=0)
    models = {"m0": m0}
    for name, layer in (("m1", 1), ("m2", 0)):
        m = tiny_model("bert", seed=0)
        m.load_state_dict(m0.state_dict())
        with torch.no_grad():
            for p in m.bert.encoder.layer[layer].parameters():
                p.add_(0.05)
        models[name] = m.eval()
    return models


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """The tiny family's models, built once per test module."""
    return family_models()


def load(hub, repo_id: str, cache: Path, **kwargs):
    """``DedupedModel.from_pretrained`` of ``repo_id`` from the local Hub into ``cache``."""
    return DedupedModel.from_pretrained(repo_id, endpoint=hub.url, cache_dir=cache, **kwargs)


def make_family(root: Path, models: dict[str, torch.nn.Module]) -> FamilyStore:
    family = FamilyStore.create(root, block_size=BLOCK)
    tokenizer = tiny_tokenizer(root.parent / f"{root.name}-tok")
    for i, (name, model) in enumerate(models.items()):
        family.add_model(name, model, tokenizer=tokenizer,
                         privacy=PrivacyMetadata(float(2**i), 1e-5, ("private-reviews",), accountant="rdp"))
    return family


def logits(model, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(**example_inputs("bert", seed=seed)).logits


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() or p.is_symlink())
