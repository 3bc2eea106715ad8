"""The Hugging Face Hub side of hf_dpdedup: push families, load members, model cards.

- :func:`push_family_to_hub` — block store repo first, then one repo per member, pinned to the
  store's commit sha (``hf-dpdedup push`` on the command line);
- ``DedupedModel.from_pretrained("namespace/member")`` — resolves members through
  :mod:`hf_dpdedup.hub.download` (only the shards a member needs, from the huggingface_hub cache);
- :func:`pipeline` — a ``transformers.pipeline`` around a member in one call;
- :mod:`hf_dpdedup.hub.cards` — DP model cards; :mod:`hf_dpdedup.hub.local_server` — a small
  Hub-compatible server for offline demos and tests.
"""

from .pipelines import pipeline
from .push import PushResult, RepoPush, push_family_to_hub, store_repo_id

__all__ = ["PushResult", "RepoPush", "pipeline", "push_family_to_hub", "store_repo_id"]
