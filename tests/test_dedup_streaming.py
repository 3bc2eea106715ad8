"""Streaming dedup: lazy members are loaded one at a time and let go once stored, with the very
same store, plans and ledgers as members held in memory."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref

import pytest
import torch
from transformers import BertForSequenceClassification

from hf_dpdedup.blocks import BlockRows, plan_layout, to_block_matrix
from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.tasks import classification_predict, classification_score
from hf_dpdedup.privacy import PrivateDataset
from hf_dpdedup.store.block_store import BlockStore, row_hashes

from test_dedup_engine import BLOCK, make_family


def _folders(members, root):
    for m in members:
        m.model.save_pretrained(root / m.name)
        (root / m.name / "privacy.json").write_text(json.dumps(m.privacy.to_dict()))
    return [root / m.name for m in members]


class LoadCounter:
    """Loads members from folders and records how many loaded models were alive at each load."""

    def __init__(self) -> None:
        self.alive: list[weakref.ref] = []
        self.most_alive = 0
        self.loads = 0
        self.ids: set[int] = set()

    def loader(self, folder):
        def load():
            gc.collect()  # transformers models hold reference cycles: count only what is really held
            self.alive = [r for r in self.alive if r() is not None]
            model = BertForSequenceClassification.from_pretrained(folder).eval()
            self.alive.append(weakref.ref(model))
            self.ids.add(id(model))
            self.loads += 1
            self.most_alive = max(self.most_alive, len(self.alive))
            return model
        return load


def _store_digest(path):
    files = sorted(p for p in (path / "block_store").iterdir() if p.suffix == ".safetensors")
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]


@pytest.mark.parametrize("validation", ["public", "svt", "svt-agreement"])
def test_lazy_members_give_the_same_family_with_two_models_in_memory_at_most(tmp_path, validation):
    eager, batches = make_family()
    extra, _ = make_family()  # a fourth member: more targets than the two models allowed in memory
    extra = extra[1]
    extra.name = "eps4"
    extra.privacy = type(extra.privacy)(4.0, 1e-5, ("toy-train",))
    with torch.no_grad():
        for p in extra.model.parameters():
            p.mul_(1.001)
    eager.append(extra)
    folders = _folders(eager, tmp_path / "models")

    predicted_with: set[int] = set()  # every model predict_fn saw: only members, never a frozen copy

    def predict(model, batch):
        predicted_with.add(id(model))
        return classification_predict(model, batch)

    def data():
        private = None
        if validation.startswith("svt"):
            cols = {"input_ids": torch.cat([b["input_ids"] for b in batches[3:]]),
                    "labels": torch.cat([b["labels"] for b in batches[3:]])}
            private = PrivateDataset(cols, dataset_id="toy-train", public_size=300, batch_size=100)
        return DedupData(classification_score, public_val=batches[:3], public_test=batches[3:], private_val=private,
                         predict_fn=predict)

    agreement = validation == "svt-agreement"
    config = DedupConfig(block_size=BLOCK, threshold=0.03, validation="svt" if agreement else validation,
                         noise_seed=5, agreement=agreement)
    reloaded = [Member(f.name, BertForSequenceClassification.from_pretrained(f).eval(), m.privacy, files_from=f)
                for f, m in zip(folders, eager)]
    held = deduplicate_family(reloaded, data(), config, tmp_path / "held")

    counter = LoadCounter()
    lazy = [Member.from_folder(f, m.privacy, counter.loader(f)) for f, m in zip(folders, eager)]
    predicted_with.clear()
    streamed = deduplicate_family(lazy, data(), config, tmp_path / "streamed")
    if agreement:  # the mechanism held the targets' predictions: no model but the loaded ones predicted
        assert predicted_with and predicted_with <= {id(r()) for r in counter.alive if r() is not None} | counter.ids

    assert counter.most_alive <= 2  # the base and the model under validation, never more
    assert all(m.model is None for m in lazy)  # every lazy member was let go once stored
    assert all(r.model is None for r in streamed.models)
    assert _store_digest(tmp_path / "held") == _store_digest(tmp_path / "streamed")
    for a, b in zip(held.models, streamed.models):
        assert (a.name, a.role, a.from_base, a.from_self, a.own_blocks, a.validations) == \
               (b.name, b.role, b.from_base, b.from_self, b.own_blocks, b.validations)
        assert [c.to_dict() for c in a.charges] == [c.to_dict() for c in b.charges]
        assert a.ledger == b.ledger
        assert a.floor == b.floor
    assert sum(m.from_base for m in streamed.models) > 0  # the run deduplicated something


def test_block_rows_are_views_and_store_like_the_matrix(tmp_path):
    sd = {"a": torch.randn(5, 7), "b": torch.randn(300), "c": torch.randn(3)}
    layout = plan_layout(sd, 16)
    rows = BlockRows.of(sd, layout)
    matrix = to_block_matrix(sd, layout)
    assert rows.shape == tuple(matrix.shape)
    assert torch.equal(rows.matrix(), matrix)
    assert torch.equal(rows.take([3, 0, 2]), matrix[[3, 0, 2]])
    assert row_hashes(rows) == row_hashes(matrix)
    full = rows.row(3)  # a full block of "b" is a view of "b"
    assert full.untyped_storage().data_ptr() == sd["b"].untyped_storage().data_ptr()
    sd["b"][:16].fill_(7.0)  # rows follow their tensors
    assert bool((rows.row(3) == 7.0).all())
    matrix = to_block_matrix(sd, layout)
    one = BlockStore.create(tmp_path / "one", block_size=16, dtype=torch.float32)
    two = BlockStore.create(tmp_path / "two", block_size=16, dtype=torch.float32)
    groups = [t.n_blocks for t in layout.tensors]
    assert one.add_rows(matrix, groups=groups, max_shard_bytes=16 * 4 * 5) == \
        two.add_rows(BlockRows.of(sd, layout), groups=groups, max_shard_bytes=16 * 4 * 5)
    assert [s.sha256 for s in one.index.shards] == [s.sha256 for s in two.index.shards]
    assert len(one.index.shards) > 1  # several shards: each written from its own rows
