"""Serving many members of a family from one process (see :class:`ServingPool`).

``ServingPool`` keeps the family's blocks in memory once and composes members on request, sharing
every tensor two members hold identically; :func:`hf_dpdedup.serving.http.make_server` answers
inference requests by member id over HTTP on 127.0.0.1. See ``docs/serving.md``.
"""

from .pool import ServingPool

__all__ = ["ServingPool"]
