"""The Hugging Face Hub side of hf_dpdedup: push families, load members, model cards.

- :func:`push_family_to_hub` — block store repo first, then one repo per member, pinned to the
  store's commit sha (``hf-dpdedup push`` on the command line);
- ``DedupedModel.from_pretrained("namespace/family-member")`` — resolves members through
  :mod:`hf_dpdedup.hub.download` (only the shards a member needs, from the huggingface_hub cache);
- :mod:`hf_dpdedup.hub.remote` — the ``auto_map`` + ``modeling_hf_dpdedup.py`` every member repo
  ships, so ``AutoModelFor<Task>.from_pretrained(repo, trust_remote_code=True)`` loads it too;
- :mod:`hf_dpdedup.hub.retry` — 429 / 5xx retried with backoff, honouring ``Retry-After``;
- :mod:`hf_dpdedup.hub.cards` — DP model cards. (The Hub-compatible server of the offline demo
  and the tests is :class:`hf_dpdedup.testing.HubServer`.)
"""

from __future__ import annotations

from .push import PushResult, RepoPush, member_repo_id, push_family_to_hub, store_repo_id

__all__ = ["PushResult", "RepoPush", "member_repo_id", "push_family_to_hub", "store_repo_id"]
