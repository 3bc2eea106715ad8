"""Serving benchmark: the pool against loading full models with transformers, one memory budget.

Family: 10 MiniLM-L6 sequence classifiers (the bundled real MiniLM) that differ, as this project's
DP fine-tuned members do, in the top encoder layer, the pooler and the classifier; stored with
``FamilyStore.add_model`` (exact dedup shares everything else), block size 65,536, float32. The
baseline loads each member's plain ``save_pretrained`` folder with transformers.

Measured in one run (shared 2-core machine: read the ratios):
- ``{pattern}_*``: 100 SST-2 dev queries (batch of one sentence), round robin and random (seed 0),
  budget = 2 full models for both: model-switch time (getting the model), inference, total; the
  pool under its byte budget, and ``{pattern}_forced_*`` with the pool also capped at 2 resident
  members (every round-robin query is then a switch: the pure cost of one composition).
- ``rss_*``: RSS growth (psutil, a fresh subprocess per setting) with all 10 members loaded and run
  once (``*_touched``: and every weight read once): the pool vs. the family's stored-block bytes,
  transformers vs. one model's bytes. transformers maps the safetensors files, so pages no query
  touched (most rows of the word embeddings) are not resident until touched.
- ``concurrency_*``: 8 threads, 1,000 mixed requests through a pool capped at 2 resident members;
  every answer compared with the member's reference model (``DedupedModel.from_pretrained``).

Run: python benchmarks/serve_benchmark.py [--queries 100]   (~6 minutes on 2 shared cores; peak memory < 2 GiB)
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import torch
from transformers.utils.logging import disable_progress_bar

from common import minilm_folder, write_results
from hf_dpdedup.data import builtin_path
from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.serving import ServingPool
from hf_dpdedup.serving.bench import (
    PATTERNS, TransformersLRU, compare, query_inputs, query_order, read_sentences, save_plain_folders,
)

SST2_DEV = builtin_path("sst2", "dev")
MEMBERS = 10


def build_family(root: Path) -> tuple[FamilyStore, dict[str, Path]]:
    """10 members (top layer, pooler and classifier differ) as a family and as plain folders."""
    from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

    base = AutoModel.from_pretrained(minilm_folder()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = base.config
    config.num_labels, config.architectures = 2, ["BertForSequenceClassification"]
    family = FamilyStore.create(root / "family", block_size=65536)
    for i in range(MEMBERS):
        torch.manual_seed(i)
        member = BertForSequenceClassification(config).eval()
        member.bert.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            for p in [*member.bert.encoder.layer[-1].parameters(), *member.bert.pooler.parameters()]:
                p.add_(0.01 * (i + 1) * torch.randn_like(p) * p.std())
        name = f"minilm-sst2-m{i:02d}"
        family.add_model(name, member, tokenizer=tokenizer)
    return family, save_plain_folders(family, root / "plain", family.members())


def shard_bytes(family: FamilyStore) -> int:
    return sum(s.bytes for s in family.blocks.index.shards)


# --- RSS, one fresh process per setting -----------------------------------------------------------------
def touch(model: torch.nn.Module) -> None:
    """Read every weight once (a long-running server's queries eventually touch every page)."""
    with torch.inference_mode():
        for p in model.parameters():
            p.sum()


def rss_child(setting: str, root: Path, touch_all: bool) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.set_num_threads(1)
    family = FamilyStore.open(root / "family")
    names = family.members()
    inputs = query_inputs(family.member_path(names[0]), ["a gripping , beautifully acted film ."], 1)[0]
    tiny = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with torch.inference_mode():  # warm the kernels, so only models count
        BertForSequenceClassification(tiny).eval()(**inputs)
    gc.collect()
    before = psutil.Process().memory_info().rss
    keep = []
    if setting == "pool":
        pool = ServingPool(family, budget_models=2)
        for name in names:
            pool.infer(name, **inputs)
            if touch_all:
                with pool.use(name) as model:
                    touch(model)
        assert len(pool.resident()) == len(names), pool.resident()
        keep.append(pool)
    else:
        for name in names:
            model = BertForSequenceClassification.from_pretrained(root / "plain" / name).eval()
            with torch.inference_mode():
                model(**inputs)
            if touch_all:
                touch(model)
            keep.append(model)
    gc.collect()
    print(json.dumps({"rss_delta": psutil.Process().memory_info().rss - before}))


def measure_rss(setting: str, root: Path, touch_all: bool = False) -> int:
    extra = ["--touch"] if touch_all else []
    out = subprocess.run([sys.executable, __file__, "--rss-child", setting, "--root", str(root), *extra],
                         check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_delta"])


# --- concurrency ------------------------------------------------------------------------------------------
def concurrency(family: FamilyStore, inputs: list[dict], threads: int = 8, requests: int = 1000) -> dict[str, float]:
    names = family.members()
    refs = {}
    for name in names:
        model = DedupedModel.from_pretrained(family.member_path(name))
        with torch.inference_mode():
            refs[name] = [model(**x).logits for x in inputs]
        del model
    pool = ServingPool(family, budget_models=2, max_models=2)
    order = query_order(names, requests, "random", seed=1)
    wrong, errors = [], []
    peak_rss = [psutil.Process().memory_info().rss]

    def worker(k: int) -> None:
        try:
            for i in range(k, requests, threads):
                out = pool.infer(order[i], **inputs[i % len(inputs)]).logits
                if not torch.equal(out, refs[order[i]][i % len(inputs)]):
                    wrong.append(i)
                peak_rss[0] = max(peak_rss[0], psutil.Process().memory_info().rss)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    memory = pool.memory()
    return {
        "concurrency_requests": requests,
        "concurrency_wrong_answers": len(wrong) + len(errors),
        "concurrency_hung_threads": sum(w.is_alive() for w in workers),
        "concurrency_peak_used_over_budget": memory["peak_bytes"] / memory["budget_bytes"],
        "concurrency_switches": pool.stats().get("switches", 0),
        "concurrency_peak_rss_bytes": peak_rss[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rss-child", choices=("pool", "baseline"))
    parser.add_argument("--root", type=Path)
    parser.add_argument("--touch", action="store_true")
    args = parser.parse_args()
    disable_progress_bar()  # as a server would: no progress bar per load
    if args.rss_child:
        return rss_child(args.rss_child, args.root, args.touch)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        family, folders = build_family(root)
        names = family.members()
        inputs = query_inputs(family.member_path(names[0]), read_sentences(SST2_DEV, args.queries), args.queries)
        pool = ServingPool(family, budget_models=2)
        figures = {"members": len(names), "queries": args.queries, "full_model_bytes": pool.full_model_bytes,
                   "stored_block_bytes": shard_bytes(family), "budget_bytes": pool.budget_bytes}
        klass = pool.plan(names[0]).klass
        for pattern in PATTERNS:
            order = query_order(names, args.queries, pattern, seed=0)
            pool = ServingPool(family, budget_models=2)
            figures.update(compare(pool, TransformersLRU(folders, klass, 2), order, inputs, prefix=f"{pattern}_"))
            figures[f"{pattern}_pool_peak_used_bytes"] = pool.memory()["peak_bytes"]
            forced = ServingPool(family, budget_models=2, max_models=2)
            baseline = TransformersLRU(folders, klass, 2)
            figures.update(compare(forced, baseline, order, inputs, prefix=f"{pattern}_forced_"))
            del pool, forced, baseline
            gc.collect()
        figures.update(concurrency(family, inputs[:20]))
        for suffix, touch_all in (("", False), ("_touched", True)):
            pool_rss, base_rss = measure_rss("pool", root, touch_all), measure_rss("baseline", root, touch_all)
            figures[f"rss_pool_all{suffix}_bytes"] = pool_rss
            figures[f"rss_baseline_all{suffix}_bytes"] = base_rss
            figures[f"rss_pool_over_stored_blocks{suffix}"] = pool_rss / figures["stored_block_bytes"]
            figures[f"rss_baseline_over_one_model{suffix}"] = base_rss / figures["full_model_bytes"]
            figures[f"rss_baseline_over_pool{suffix}"] = base_rss / pool_rss
    write_results("serve", figures)


if __name__ == "__main__":
    main()
