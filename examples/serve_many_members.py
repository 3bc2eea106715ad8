"""Serve several members of one family from one process, picking a model per request by its ε.

    python examples/serve_many_members.py   # offline; trains + deduplicates the demo family first (minutes)

``hf_dpdedup.serving.ServingPool`` loads the family's blocks once and composes a member on request:
tensors a member shares with another are the same memory, so every member costs only its own
blocks. The pool keeps members under a memory budget (here: what 2 ordinary models would take) and
evicts the least recently used one when a new member would not fit.
"""

import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_dpdedup.demo import build_family
from hf_dpdedup.serving import ServingPool
from hf_dpdedup.serving.http import make_server

with tempfile.TemporaryDirectory() as tmp:
    family, members, _ = build_family(Path(tmp), block_size=65536, epsilons=(1.0, 4.0, 8.0))
    t0 = time.perf_counter()
    pool = ServingPool(family.root, budget_models=2)
    memory = pool.memory()
    print(f"pool opened in {time.perf_counter() - t0:.2f}s: blocks {memory['block_bytes'] / 2**20:.1f} MiB, "
          f"budget {memory['budget_bytes'] / 2**20:.1f} MiB (2 models of {pool.full_model_bytes / 2**20:.1f} MiB)")
    # ε after deduplication (a member that borrows blocks is charged for them)
    member_of = {pool.plan(name).constitution.privacy.epsilon: name for name in pool.members}
    tokenizer = AutoTokenizer.from_pretrained(pool.plan(pool.members[0]).path)

    def answer(text: str, max_epsilon: float) -> list[float]:
        """Serve with the most accurate model whose budget the caller accepts (largest ε ≤ max)."""
        member = member_of[max(e for e in member_of if e <= max_epsilon)]
        logits = pool.infer(member, **tokenizer(text, return_tensors="pt")).logits
        return logits.softmax(-1)[0].tolist()

    for budget in (1, 5, 10):
        print(f"request with ε ≤ {budget}: {answer('a gripping , beautifully acted film .', budget)}")
    print(f"resident: {pool.resident()}; {pool.memory()['used_bytes'] / 2**20:.1f} MiB used; stats {pool.stats()}")

    # The same pool over HTTP on 127.0.0.1 (a demonstration endpoint: no auth, no TLS).
    server = make_server(pool, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/members/{pool.members[1]}/infer"
    request = urllib.request.Request(url, data=json.dumps({"text": "one long string of cliches ."}).encode())
    with urllib.request.urlopen(request) as resp:
        print(f"POST {url} -> {json.loads(resp.read())['outputs']['logits']}")
    server.shutdown()
    with torch.inference_mode(), pool.use(pool.members[-1]) as model:  # valid inside the block only
        print(f"{pool.members[-1]}: {sum(p.numel() for p in model.parameters()):,} parameters, read-only")
