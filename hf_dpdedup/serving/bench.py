"""The serving workload: a stream of queries by member id, served by the pool or by the baseline.

The baseline is the usual way: keep up to ``capacity`` transformers models in memory (LRU) and load
a requested model's full safetensors folder with ``from_pretrained`` when it is not resident. Both
servers expose ``use(member)`` (a context manager yielding the model), so one loop times both:
*switch* time is the time to get the model (composing or loading it when not resident), *inference*
time the forward pass.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from transformers import AutoConfig

from ..modeling import DedupedModel
from .plan import load_tokenizer

PATTERNS = ("round-robin", "random")


class Server(Protocol):
    def use(self, member: str) -> Any: ...


def query_order(members: Sequence[str], queries: int, pattern: str, *, seed: int = 0) -> list[str]:
    """Member id of each query: cycling through ``members``, or drawn uniformly (seeded)."""
    if pattern == "round-robin":
        return [members[i % len(members)] for i in range(queries)]
    if pattern == "random":
        rng = random.Random(seed)
        return [rng.choice(list(members)) for _ in range(queries)]
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


class TransformersLRU:
    """Baseline server: up to ``capacity`` models loaded with ``klass.from_pretrained(folder)``."""

    def __init__(self, folders: Mapping[str, Path], klass: type, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"The baseline must hold at least one model, got capacity {capacity}.")
        self.folders, self.klass, self.capacity = dict(folders), klass, capacity
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self.loads = 0

    @contextmanager
    def use(self, member: str) -> Iterator[torch.nn.Module]:
        model = self._models.get(member)
        if model is None:
            while len(self._models) >= self.capacity:
                self._models.popitem(last=False)
            model = self._models[member] = self.klass.from_pretrained(self.folders[member]).eval()
            self.loads += 1
        self._models.move_to_end(member)
        yield model


def run_queries(server: Server, order: Sequence[str], inputs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Serve query ``i`` (member ``order[i]``, inputs ``inputs[i % len(inputs)]``); return timings.

    ``switch_s`` sums the time to obtain each model, ``inference_s`` the forward passes,
    ``total_s`` the wall time of the whole stream."""
    switch = inference = 0.0
    start = time.perf_counter()
    for i, member in enumerate(order):
        t0 = time.perf_counter()
        with server.use(member) as model:
            t1 = time.perf_counter()
            with torch.inference_mode():
                model(**inputs[i % len(inputs)])
            t2 = time.perf_counter()
        switch += t1 - t0
        inference += t2 - t1
    return {"switch_s": switch, "inference_s": inference, "total_s": time.perf_counter() - start}


def save_plain_folders(family: Any, out: Path, members: Sequence[str]) -> dict[str, Path]:
    """Each member rebuilt and saved the usual way (``save_pretrained``): the baseline's input."""
    folders = {}
    for name in members:
        folders[name] = out / name
        if not (folders[name] / "config.json").is_file():
            DedupedModel.from_pretrained(family.member_path(name)).save_pretrained(folders[name])
    return folders


def compare(pool: Any, baseline: TransformersLRU, order: Sequence[str], inputs: Sequence[Mapping[str, torch.Tensor]],
            *, prefix: str = "") -> dict[str, float]:
    """Run the same stream through the pool and the baseline; figures and their ratios.

    Both are warmed first (imports, kernels) on the stream's first member, which stays resident."""
    run_queries(pool, order[:1], inputs)
    run_queries(baseline, order[:1], inputs)
    before = pool.stats()
    ours = run_queries(pool, order, inputs)
    loads_before = baseline.loads
    theirs = run_queries(baseline, order, inputs)
    after = pool.stats()
    figures = {f"pool_{k}": v for k, v in ours.items()}
    figures.update({f"baseline_{k}": v for k, v in theirs.items()})
    figures["pool_switches"] = after.get("switches", 0) - before.get("switches", 0)
    figures["baseline_loads"] = baseline.loads - loads_before
    figures["switch_ratio"] = theirs["switch_s"] / max(ours["switch_s"], 1e-9)
    figures["total_ratio"] = theirs["total_s"] / max(ours["total_s"], 1e-9)
    return {prefix + k: v for k, v in figures.items()}


def read_sentences(path: Path, limit: int) -> list[str]:
    """Up to ``limit`` sentences: the ``sentence`` column of a TSV with a header, else one per line."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = lines[0].split("\t")
    if "sentence" in header:
        col = header.index("sentence")
        return [ln.split("\t")[col] for ln in lines[1 : limit + 1]]
    return lines[:limit]


def query_inputs(
    member_dir: Path, sentences: Sequence[str] | None, count: int, *, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """One batch-of-one input per query: ``sentences`` tokenized with the member's tokenizer, or
    (without sentences or tokenizer) random token ids of length 16 from the config's vocabulary."""
    if sentences:
        tokenizer = load_tokenizer(member_dir)
        if tokenizer is not None:
            return [dict(tokenizer(s, truncation=True, max_length=64, return_tensors="pt"))
                    for s in list(sentences)[:count]]
    vocab = AutoConfig.from_pretrained(member_dir).vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (1, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
