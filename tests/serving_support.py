"""A tiny family for the serving tests: shared, differing and partly shared tensors, two architectures."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import example_inputs, tiny_model
from hf_dpdedup import DedupedModel, FamilyStore

BLOCK = 256  # tiny BERT: 32x32 weights are 4 blocks, the word embeddings 15


def _nudge(tensor: torch.Tensor, seed: int, first: int | None = None) -> None:
    """Add noise to ``tensor`` (or only to its first ``first`` elements, i.e. some of its blocks)."""
    g = torch.Generator().manual_seed(seed)
    flat = tensor.view(-1)[:first] if first is not None else tensor.view(-1)
    flat.add_(0.05 * torch.randn(flat.shape, generator=g))


def build_family(root: Path) -> tuple[FamilyStore, dict[str, torch.nn.Module]]:
    """Members (tiny BERT classifiers unless noted):

    - ``base``; ``top1``/``top2``: base with the top layer and classifier changed (whole new tensors);
    - ``part1``: base with the first block of layer-0 query weight changed (a gathered tensor);
      ``part2``: the same gathered tensor as ``part1`` plus another classifier (shares the gather);
    - ``mlm``: another architecture (tiny BERT masked LM with tied embeddings).
    """
    base = tiny_model("bert", seed=0)
    models: dict[str, torch.nn.Module] = {"base": base}
    sd = base.state_dict()
    with torch.no_grad():
        for i in (1, 2):
            m = tiny_model("bert", seed=0)
            for p in m.bert.encoder.layer[-1].parameters():
                _nudge(p, seed=10 * i + p.numel())
            _nudge(m.classifier.weight, seed=i)
            models[f"top{i}"] = m
        part1 = tiny_model("bert", seed=0)
        _nudge(part1.bert.encoder.layer[0].attention.self.query.weight, seed=5, first=BLOCK)
        models["part1"] = part1
        part2 = tiny_model("bert", seed=0)
        part2.load_state_dict(part1.state_dict())
        _nudge(part2.classifier.weight, seed=6)
        models["part2"] = part2
    assert torch.equal(sd["bert.embeddings.word_embeddings.weight"],
                       models["top1"].state_dict()["bert.embeddings.word_embeddings.weight"])
    models["mlm"] = tiny_model("bert-mlm", seed=3)
    family = FamilyStore.create(root / "family", block_size=BLOCK)
    for name, model in models.items():
        family.add_model(name, model)
    return family, models


def inputs_for(seed: int = 1) -> dict[str, torch.Tensor]:
    return example_inputs("bert", batch=2, seed=seed)


def reference_logits(family: FamilyStore, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = DedupedModel.from_pretrained(family.member_path(name))
    with torch.inference_mode():
        return model(**inputs).logits
