"""Serve several members of one family from one process, picking a model per request by its ε.

    python examples/serve_many_members.py          # offline: pushes a family to a local Hub first

``hf_dpdedup.serving`` (a memory-capped pool) is not written yet, so this example loads every member
with ``DedupedModel.from_pretrained`` from one shared huggingface_hub cache: the shards members share
are downloaded once, and each member costs only its own blocks on top.
"""

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_dpdedup import DedupedModel, push_family_to_hub
from hf_dpdedup.demo import build_family
from hf_dpdedup.hub.local_server import local_hub


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


with tempfile.TemporaryDirectory() as tmp, local_hub("demo") as (endpoint, token):
    tmp = Path(tmp)
    family, members, _ = build_family(tmp, block_size=65536, epsilons=(1.0, 4.0, 8.0))
    push_family_to_hub(family, "demo", family_name="minilm-example", token=token, endpoint=endpoint)
    cache = tmp / "hf-cache"
    pool = {}
    for name in members:
        t0 = time.perf_counter()
        model = DedupedModel.from_pretrained(f"demo/{name}", endpoint=endpoint, token=token, cache_dir=cache)
        pool[model.dedup_info.epsilon] = model
        print(f"loaded {name} (ε = {model.dedup_info.epsilon:g}) in {time.perf_counter() - t0:.2f}s; "
              f"cache now {folder_bytes(cache) / 2**20:.1f} MiB")
    tokenizer = AutoTokenizer.from_pretrained(next(iter(pool.values())).dedup_info.member_path)

    def answer(text: str, max_epsilon: float) -> list[float]:
        """Serve with the most accurate model whose budget the caller accepts (largest ε ≤ max)."""
        epsilon = max(e for e in pool if e <= max_epsilon)
        with torch.no_grad():
            return pool[epsilon](**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()

    for budget in (1, 5, 10):
        print(f"request with ε ≤ {budget}: {answer('a gripping , beautifully acted film .', budget)}")
