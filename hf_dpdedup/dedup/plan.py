"""From a target model to its ordered list of candidate replacements.

Blocks are ordered least salient first; each block's candidate is its nearest block (L2 by
default) among the base model's blocks and the target's own *other* blocks. Blocks equal to a base block are skipped (exact deduplication already shares them). A target block that
serves as the source of another block is pinned (never replaced itself), and a block already
planned for replacement is never used as a source, so no replacement chain can form: every
replaced block ends up equal to a block that is stored anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.block_store import row_hashes
from .live import LiveBlocks, Replacement
from .saliency import block_saliency, saliency_order
from .similarity import nearest_blocks


@dataclass(frozen=True)
class PlanConfig:
    saliency: str = "magnitude"
    aggregate: str = "mean"
    metric: str = "l2"
    top_k: int = 4
    use_self: bool = True
    method: str = "exact"  # or "sketch" for very large families
    only_tensors: frozenset[str] | None = None  # restrict replacements to these tensors


def plan_replacements(
    target,
    live: LiveBlocks,
    base_matrix: torch.Tensor,
    config: PlanConfig,
    *,
    calibration=None,
    loss_fn=None,
) -> list[Replacement]:
    """Candidate replacements for ``target``, least salient block first."""
    target_matrix = live.matrix()
    n = target_matrix.shape[0]
    if n == 0:
        return []
    scores = block_saliency(target, live.layout, measure=config.saliency, aggregate=config.aggregate,
                            calibration=calibration, loss_fn=loss_fn)
    # A block equal to a base block is already shared by exact deduplication: nothing to decide.
    base_rows = set(row_hashes(base_matrix))
    skip = {i for i, h in enumerate(row_hashes(target_matrix)) if h in base_rows}
    if config.only_tensors is not None:
        owners = live.layout.block_owner()
        skip |= {i for i in range(n) if owners[i][0] not in config.only_tensors}
    order = [b for b in saliency_order(scores).tolist() if b not in skip]
    if not order:
        return []
    m = base_matrix.shape[0]
    rows = torch.tensor(order)
    if config.use_self:  # candidates: base blocks, then the target's own (numbered m + i)
        candidates, exclude = (base_matrix, target_matrix), rows + m  # never a block's own match
    else:
        candidates, exclude = (base_matrix,), None
    k = max(1, min(config.top_k, sum(c.shape[0] for c in candidates) - 1))
    match = nearest_blocks(target_matrix[rows], candidates, metric=config.metric, k=k,
                           exclude_self=exclude, method=config.method)
    planned: set[int] = set()
    pinned: set[int] = set()
    sequence: list[Replacement] = []
    for position, block in enumerate(order):
        if block in pinned:
            continue  # the source of an earlier replacement: keeps its own values
        for cand in match.indices[position].tolist():
            if cand < 0:
                continue
            if cand < m:
                rep = Replacement(block, "base", cand, base_matrix[cand])
            else:
                source = cand - m
                if source == block or source in planned:
                    continue
                pinned.add(source)
                rep = Replacement(block, "self", source, target_matrix[source])
            planned.add(block)
            sequence.append(rep)
            break
    return sequence
