"""Test doubles and helpers that ship with the package for the demo, the examples and the benchmarks.

In the package only the demo (:mod:`hf_dpdedup.demo`) imports it: it is where the things that stand
in for the outside world live, so that the rest of the house has no test-only code.

- :class:`HubServer`, :func:`local_hub` (:mod:`hf_dpdedup.testing.hub_server`): a small
  Hub-compatible HTTP server on 127.0.0.1 (model and dataset repos, git-LFS batch API, tags,
  gated repos), which the real ``huggingface_hub`` client talks to; the demo's ``--hub-endpoint
  local`` and the test suite use it.
- :class:`CandidatePool`, :func:`candidate_pool` (:mod:`hf_dpdedup.testing.candidates`): a
  target's candidate blocks (the base's then its own) for :func:`hf_dpdedup.dedup.similarity.nearest_blocks`,
  as the match benchmark and the similarity tests build them.
"""

from .candidates import CandidatePool, candidate_pool
from .hub_server import Fault, HubServer, local_hub, repo_key

__all__ = ["CandidatePool", "Fault", "HubServer", "candidate_pool", "local_hub", "repo_key"]
