"""8 threads, 1,000 mixed requests through a pool that must keep evicting and re-pointing models."""

from __future__ import annotations

import random
import threading

import torch

from hf_dpdedup.serving import ServingPool
from serving_support import build_family, inputs_for, reference_logits

THREADS, REQUESTS, INPUTS, MAX_MODELS = 8, 1000, 3, 2


def test_concurrent_requests_get_their_own_members_answers(tmp_path):
    fam, _ = build_family(tmp_path)
    names = fam.members()
    inputs = [inputs_for(seed=s) for s in range(INPUTS)]
    refs = {(n, i): reference_logits(fam, n, x) for n in names for i, x in enumerate(inputs)}
    budget = ServingPool(fam.root).memory()["block_bytes"] + 8000  # the blocks + about 2 members
    pool = ServingPool(fam.root, budget_bytes=budget, max_models=MAX_MODELS, wait_timeout=30)
    rng = random.Random(0)
    # mixed: runs of 1-4 requests for one member (hits, one model used by several threads at once)
    order: list[str] = []
    while len(order) < REQUESTS:
        order += [rng.choice(names)] * rng.randint(1, 4)
    order = order[:REQUESTS]
    wrong: list[int] = []
    failures: list[str] = []
    max_resident = [0]

    def worker(k: int) -> None:
        try:
            for i in range(k, REQUESTS, THREADS):
                out = pool.infer(order[i], **inputs[i % INPUTS]).logits
                if not torch.equal(out, refs[order[i], i % INPUTS]):
                    wrong.append(i)
                max_resident[0] = max(max_resident[0], len(pool.resident()))
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    assert failures == []
    assert wrong == []
    stats, memory = pool.stats(), pool.memory()
    assert stats["hits"] + stats["switches"] == REQUESTS
    assert stats["switches"] > 50 and stats["reused_template"] > 50  # the re-pointing path was hammered
    # bounded memory: never more than MAX_MODELS members, and module trees built at most once per
    # resident slot per architecture (switches re-point existing ones)
    assert max_resident[0] <= MAX_MODELS and memory["resident"] <= MAX_MODELS
    assert stats["built_model"] <= MAX_MODELS + 1
    assert memory["peak_bytes"] <= budget
