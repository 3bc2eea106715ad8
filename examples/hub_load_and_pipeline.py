"""Load a deduplicated member from the Hub with ``from_pretrained`` and run a ``pipeline`` on it.

    python examples/hub_load_and_pipeline.py                          # offline: pushes a family to a local Hub first
    python examples/hub_load_and_pipeline.py my-org/minilm-sst2-eps4  # a member on huggingface.co

Only the block shards the member needs are downloaded (and cached once for all members).
"""

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import hf_dpdedup
from hf_dpdedup import DedupedModel, push_family_to_hub
from hf_dpdedup.demo import build_family
from hf_dpdedup.testing import local_hub

SENTENCES = ["a gripping , beautifully acted film .", "it never finds its footing and drags on forever ."]

with contextlib.ExitStack() as stack:
    if len(sys.argv) > 1:
        repo_id, hub = sys.argv[1], {}
    else:  # no network: publish the demo family on a local Hub-compatible server
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        family, _, _ = build_family(tmp, block_size=65536, epsilons=(1.0, 4.0))
        endpoint, token = stack.enter_context(local_hub("demo"))
        push_family_to_hub(family, "demo", family_name="minilm-example", token=token, endpoint=endpoint)
        repo_id = "demo/minilm-demo-eps4"
        hub = {"endpoint": endpoint, "token": token, "cache_dir": tmp / "hf-cache"}

    t0 = time.perf_counter()
    model = DedupedModel.from_pretrained(repo_id, **hub)  # an ordinary transformers model
    print(f"{type(model).__name__} loaded in {time.perf_counter() - t0:.2f}s; ε = {model.dedup_info.epsilon}, "
          f"δ = {model.dedup_info.delta}, blocks from {model.dedup_info.store}")

    classify = hf_dpdedup.pipeline("text-classification", repo_id, **hub)  # tokenizer from the member repo
    for sentence, prediction in zip(SENTENCES, classify(SENTENCES)):
        print(f"{prediction['label']} {prediction['score']:.3f}  {sentence}")
