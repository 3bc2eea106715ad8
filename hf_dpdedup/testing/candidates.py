"""A target's candidate blocks for :func:`~hf_dpdedup.dedup.similarity.nearest_blocks`: the base
model's blocks followed by the target's own, without copying either matrix (the match benchmark
and the similarity tests build them so; the planner passes its matrices directly)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CandidatePool:
    """The base blocks followed by the target's own blocks, without copying either matrix."""

    parts: tuple[torch.Tensor, torch.Tensor]  # (base [m, bs], target [n, bs])
    exclude_self: torch.Tensor  # int64 [n]: target i is candidate m + i

    @property
    def n_base(self) -> int:
        return self.parts[0].shape[0]

    def source(self, index: int) -> tuple[str, int]:
        """``("base", row)`` or ``("self", row)`` for a candidate index of this pool."""
        return ("base", index) if index < self.n_base else ("self", index - self.n_base)


def candidate_pool(base: torch.Tensor, target: torch.Tensor) -> CandidatePool:
    """Candidates for ``target``: ``base``'s blocks then ``target``'s own, itself excluded."""
    return CandidatePool((base, target), torch.arange(target.shape[0]) + base.shape[0])
