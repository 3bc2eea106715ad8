"""Task adapters: the cached [CLS]-head evaluation computes what the full model computes."""

from __future__ import annotations

import torch
import transformers

from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.plan import PlanConfig
from hf_dpdedup.dedup.tasks import ClsHeadTask, classification_score, tsv_batches
from hf_dpdedup.dedup.validate import public_utility
from hf_dpdedup.privacy import PrivacyMetadata
from hf_dpdedup.training.heads import BertTopClsHead

from conftest import SST2_DIR, minilm_path


def small_bert(seed: int, tokenizer) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(cfg).eval()


def dev_rows(n: int):
    rows = [line.split("\t") for line in (SST2_DIR / "dev.tsv").read_text().splitlines()[1 : n + 1]]
    return [r[1] for r in rows], [int(r[0]) for r in rows]


def test_head_and_full_forward_agree_on_every_prediction():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = small_bert(0, tokenizer)
    texts, labels = dev_rows(150)
    task = ClsHeadTask(model, tokenizer, max_length=64)
    head = [task.score_fn(model, b) for b in task.batches(texts, labels, batch_size=64)]
    full = [classification_score(model, b) for b in
            tsv_batches(tokenizer, SST2_DIR / "dev.tsv", "text-classification", batch_size=64, max_length=64)]
    assert torch.equal(torch.cat(head), torch.cat(full)[:150])
    assert all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in task.tensors)
    assert not any("attention.self" in n for n in task.tensors)  # Q/K/V feed the cached context


def test_engine_restricted_to_head_tensors_changes_nothing_else(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    base, target = small_bert(0, tokenizer), small_bert(0, tokenizer)
    task = ClsHeadTask(base, tokenizer)
    with torch.no_grad():  # like a DP family: only the head was trained
        for name, p in target.named_parameters():
            if name in task.tensors:
                p.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    texts, _ = dev_rows(200)
    val = task.batches(texts, [0] * len(texts))
    for batch in val:  # labels: the target's own predictions, so the base scores lower (no fairness drop)
        batch["labels"] = BertTopClsHead(target)(batch["residual"], batch["context"]).argmax(-1)
    data = DedupData(task.score_fn, public_val=val, calibration_loss=task.loss_fn)
    members = [Member("a", base, PrivacyMetadata(1.0, 1e-5, ("d",))), Member("b", target, PrivacyMetadata(2.0, 1e-5, ("d",)))]
    config = DedupConfig(block_size=256, threshold=0.5, interactive=False, plan=PlanConfig(only_tensors=task.tensors))
    report = deduplicate_family(members, data, config, tmp_path / "s")
    changed = {k for k, v in target.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= task.tensors
    assert report.targets[0].from_base + report.targets[0].from_self > 0
