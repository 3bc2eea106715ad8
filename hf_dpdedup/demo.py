"""The built-in demo: DP-train a family, deduplicate it, ship it through a Hub, load it back.

Everything it needs ships with the package and its dependencies: the data are scikit-learn's
8×8 digit images (bundled with scikit-learn), split into a public and a private half
(:mod:`hf_dpdedup.training.digits`). A small ViT is pre-trained on the public half without DP;
three members are DP fine-tuned from it with Opacus on the private half (ε = 1, 4, 8; encoder,
final LayerNorm and classifier, 99 % of the parameters). The engine deduplicates the family against
the ε = 1 member (public validation, accuracy may drop by at most 1.5 points, confirmed on a second
public split), stores it, reloads a member bit-exactly, pushes the family to a Hub-compatible
server started on 127.0.0.1 (or a real Hub), loads a member back by repo id in a fresh cache, runs
an image-classification ``pipeline`` on it and closes with a summary.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import ViTForImageClassification

from .dedup.planner import DedupConfig, DedupData, Member
from .dedup.storing import deduplicate_family
from .dedup.report import FamilyReport
from .dedup.tasks import classification_predict, classification_score
from .hub import push_family_to_hub
from .testing import local_hub
from .modeling import DedupedModel
from .pipelines import pipeline
from .store.family import FamilyStore
from .training import load_privacy, train_members
from .training import digits as recipe

FAMILY_NAME = "vit-digits"
EPSILONS = (1.0, 4.0, 8.0)
THRESHOLD = 0.015
BLOCK_SIZE = 1024


@dataclass
class BuiltFamily:
    family: FamilyStore
    report: FamilyReport
    members: dict[str, torch.nn.Module]  # the deduplicated models, by member name
    pretrained_accuracy: float
    trained_parameters: int
    total_parameters: int
    splits: dict[str, int]


def build_family(out: Path, *, epsilons: tuple[float, ...] = EPSILONS, block_size: int = BLOCK_SIZE,
                 threshold: float = THRESHOLD) -> BuiltFamily:
    """Pre-train, DP-train the members, deduplicate them into ``out / "family"``."""
    splits = recipe.load_splits()
    model = recipe.build_model()
    started = time.perf_counter()
    recipe.pretrain(model, splits["pretrain"])
    pretrained = recipe.accuracy(model, splits["public_test"])
    print(f"pre-trained a ViT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on "
          f"{len(splits['pretrain'][1])} public digit images without DP: public test accuracy {pretrained:.3f} "
          f"({time.perf_counter() - started:.0f} s)")
    trained = recipe.freeze_embeddings(model)
    n_trained = sum(p.numel() for n, p in model.named_parameters() if n in trained)
    print(f"DP fine-tuning {len(epsilons)} members with Opacus (ε = {', '.join(f'{e:g}' for e in epsilons)}, "
          f"δ = {recipe.DP_CONFIG.delta:g}) on {len(splits['private_train'][1])} private images ...")
    summaries = train_members(
        model=model, module=model, train_set=TensorDataset(*splits["private_train"]), forward=recipe.forward,
        criterion=nn.CrossEntropyLoss(),
        evaluate=lambda m: (recipe.accuracy(m, splits["public_val"]), recipe.accuracy(m, splits["public_test"])),
        epsilons=list(epsilons), config=recipe.DP_CONFIG, out=out / "trained", dataset_id=recipe.DATASET_ID,
        trained_names=trained, processor=recipe.processor(),
    )
    for s in summaries:
        print(f"  ε = {s.epsilon:g}: public test accuracy {s.public_test_accuracy:.3f} "
              f"(σ = {s.noise_multiplier:.2f}, {s.steps} steps, {s.seconds:.0f} s)")
    members = [Member(Path(s.path).name, ViTForImageClassification.from_pretrained(s.path).eval(),
                      load_privacy(s.path), files_from=s.path) for s in summaries]
    data = DedupData(classification_score, public_val=recipe.batches(splits["public_val"]),
                     public_confirm=recipe.batches(splits["public_confirm"]),
                     public_test=recipe.batches(splits["public_test"]), predict_fn=classification_predict)
    config = DedupConfig(block_size=block_size, threshold=threshold, interactive=False)
    print(f"deduplicating (blocks of {block_size} values, accuracy may drop by ≤ {100 * threshold:g} points on "
          f"{len(splits['public_val'][1])} public images, confirmed on {len(splits['public_confirm'][1])} others) ...")
    report = deduplicate_family(members, data, config, out / "family")
    report.save(out / "report")
    print(report.table() + "\n")
    return BuiltFamily(FamilyStore.open(out / "family"), report, {m.name: m.model for m in members}, pretrained,
                       n_trained, sum(p.numel() for p in model.parameters()),
                       {k: len(v[1]) for k, v in splits.items()})


def run_demo(out: Path, *, hub: str | None = "local", token: str | None = None, namespace: str = "demo",
             epsilons: tuple[float, ...] = EPSILONS) -> dict:
    """Build, store and reload a family; then (``hub``) push it to a Hub and load a member back.

    ``hub="local"`` starts a Hub-compatible server on 127.0.0.1 (no network needed); a URL (e.g.
    ``https://huggingface.co``) pushes there instead, with ``token`` and ``namespace``; ``None``
    skips the Hub part."""
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    built = build_family(out, epsilons=epsilons)
    name = built.report.targets[-1].name  # the highest-ε member: the most deduplicated away from itself
    original = built.members[name]
    images = _sample_images()
    inputs = recipe.processor()(images, return_tensors="pt")
    original.save_pretrained(out / "plain")
    t0 = time.perf_counter()
    ViTForImageClassification.from_pretrained(out / "plain")
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = DedupedModel.from_pretrained(built.family.member_path(name))
    dedup_s = time.perf_counter() - t0
    with torch.no_grad():
        same = torch.equal(original(**inputs).logits, loaded(**inputs).logits)
    print(f"\nreloaded {name} from the store: logits bit-identical: {same}; load {dedup_s:.3f} s "
          f"(transformers on a plain folder: {plain_s:.3f} s)")
    if not same:
        raise SystemExit("demo failed: reloaded logits differ")
    result = {"bit_identical": same, "load_s": dedup_s, "plain_load_s": plain_s, "report": built.report}
    if hub is not None:
        result["hub"] = publish_and_load(built.family, name, original, endpoint=None if hub == "local" else hub,
                                         token=token, namespace=namespace)
    result["summary"] = closing_summary(built, result, time.perf_counter() - started)
    return result


def publish_and_load(family: FamilyStore, name: str, original: torch.nn.Module, *, endpoint: str | None,
                     token: str | None, namespace: str) -> dict:
    """Push ``family`` (to a local Hub started here when ``endpoint`` is None), load ``name`` back by
    repo id in a fresh cache and run an image-classification pipeline on it."""
    images, labels = _sample_images(with_labels=True)
    with _hub(endpoint, token, namespace) as (url, token), tempfile.TemporaryDirectory() as cache:
        print(f"\npushing the family to {url} ...")
        t0 = time.perf_counter()
        pushed = push_family_to_hub(family, namespace, family_name=FAMILY_NAME, token=token, endpoint=url)
        push_s = time.perf_counter() - t0
        repo_id = pushed.members[name].repo_id
        print(f"  store {pushed.store.repo_id} @ {pushed.store.commit[:12]}, {len(pushed.members)} member repos, "
              f"{pushed.commits_made} commits, {push_s:.1f} s")
        t0 = time.perf_counter()
        model = DedupedModel.from_pretrained(repo_id, endpoint=url, token=token, cache_dir=cache)
        cold_s = time.perf_counter() - t0
        classify = pipeline("image-classification", repo_id, endpoint=url, token=token, cache_dir=cache)
        predictions = classify(images, top_k=1)
        inputs = recipe.processor()(images, return_tensors="pt")
        with torch.no_grad():
            same = torch.equal(model(**inputs).logits, original(**inputs).logits)
        downloaded = _folder_bytes(Path(cache))
    predicted = [p[0]["label"] for p in predictions]
    print(f"\n{repo_id} loaded from the Hub by repo id (fresh cache, {cold_s:.2f} s): logits bit-identical: {same}")
    print("  pipeline('image-classification'): " + ", ".join(
        f"{p[0]['label']} ({p[0]['score']:.2f}, true {y})" for p, y in list(zip(predictions, labels))[:6]))
    if not same:
        raise SystemExit("demo failed: the member loaded from the Hub differs from the original")
    info = model.dedup_info
    return {"repo_id": repo_id, "store_commit": pushed.store.commit, "bit_identical": same, "cold_load_s": cold_s,
            "push_s": push_s, "downloaded_bytes": downloaded, "epsilon_after": info.epsilon,
            "pipeline_accuracy": float(np.mean([p == str(y) for p, y in zip(predicted, labels)])),
            "pipeline_images": len(labels)}


def closing_summary(built: BuiltFamily, result: dict, seconds: float) -> dict:
    """Print and return what the demo showed, from the run's own figures."""
    report = built.report
    summary = report.summary()
    print("\nsummary")
    print(f"  trained: a ViT pre-trained on {built.splits['pretrain']} public digit images (no DP, test accuracy "
          f"{built.pretrained_accuracy:.3f}), then {len(report.models)} members DP fine-tuned with Opacus on "
          f"{built.splits['private_train']} private images; {built.trained_parameters / built.total_parameters:.0%} "
          "of the parameters DP-trained")
    for m in report.models:
        taken = f"{m.from_base}/{m.n_blocks} blocks from the base" if m.role == "target" else "the base"
        print(f"  {m.name}: public test accuracy {m.test_utility_before:.3f} → {m.test_utility_after:.3f} "
              f"(± {m.test_utility_se:.3f}, {built.splits['public_test']} images); {taken}; "
              f"ε {m.epsilon_before:.3g} → {m.epsilon_after:.3g} (δ {m.delta_before:.0e} → {m.delta_after:.0e})"
              + (" — flagged: lower public test accuracy than a lower-ε member (stored all the same)"
                 if (m.fairness or {}).get("flagged") else ""))
    print(f"  targets stored in {summary['targets_compression']:.1%} of their bytes "
          f"({summary['targets_compression_differing_tensors']:.1%} over the DP-changed tensors alone); the whole "
          f"family in {summary['family_stored_over_original']:.1%} of its members' separate bytes")
    print(f"  ε rises for every target (δ too: figures after deduplication are at the summed δ): its search read the "
          f"base's blocks and the fairness check read every lower-ε member's public utility, so their training "
          f"(ε = {report.models[0].epsilon_before:.3g} for the base, same private data) composes with the target's "
          "own, whether or not a base block was kept (docs/privacy.md)")
    print(f"  load from the store {result['load_s']:.3f} s vs transformers {result['plain_load_s']:.3f} s")
    if "hub" in result:
        hub = result["hub"]
        print(f"  Hub: pushed in {hub['push_s']:.1f} s; {hub['repo_id']} loaded by repo id in {hub['cold_load_s']:.2f} s "
              f"(downloaded {hub['downloaded_bytes'] / 2**20:.2f} MiB); pipeline labels {hub['pipeline_accuracy']:.0%} "
              f"of {hub['pipeline_images']} images right")
    print(f"  demo took {seconds:.0f} s")
    return {**{k: v for k, v in summary.items() if isinstance(v, (int, float, bool))}, "seconds": seconds}


def _sample_images(n: int = 32, *, with_labels: bool = False):
    """Public test digits as greyscale pictures (height × width × 1, uint8 0–16): what a user hands
    an image-classification pipeline. (PIL images would be converted to RGB by the pipeline.)"""
    images, labels = recipe.public_test_images()
    picked = [images[i][:, :, None] for i in range(n)]
    return (picked, [int(y) for y in labels[:n]]) if with_labels else picked


@contextlib.contextmanager
def _hub(endpoint: str | None, token: str | None, namespace: str):
    """Yield ``(url, token)``: the given Hub, or a local Hub-compatible server started for the demo."""
    if endpoint is not None:
        yield endpoint, token
        return
    with local_hub(namespace) as (url, local_token):
        yield url, local_token


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
