"""From a target model to its ordered list of candidate replacements.

**Candidates.** In a fine-tuned family every member moved from the same pre-trained weights, so a
block's natural candidate is the base's block at the same tensor and position (``"aligned"``, the
default). A block of the target itself or of the base at another position is offered instead only
when it is *genuinely* close: nearer than ``close_ratio`` times both the block's own distance to its
aligned base block and the block's own size (its distance to zero) — never because two blocks are
both small, which is what nearest-by-L2 over
"base ∪ self" picks on DP-trained members (measured: 5.6 test points lost). ``"nearest"`` is the
paper's rule (the nearest block among the base's and the target's own, by ``metric``), kept for
heterogeneous families and as the baseline; ``close_ratio=None`` turns the guard off.

**Order.** ``order="cost"`` (default) tries the replacements cheapest first by their estimated
loss increase (:mod:`.cost`: Taylor/Fisher terms on public calibration data, or data-free
variants); ``order="saliency"`` is the paper's order (least salient block first, :mod:`.saliency`).

Blocks equal to a base block are skipped (exact deduplication already shares them). A target block
that serves as the source of another block is pinned (never replaced itself), and a block already
planned for replacement is never used as a source, so no replacement chain can form: every replaced
block ends up equal to a block that is stored anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..blocks import BlockRows, as_block_rows
from ..store.row_digests import row_hashes
from .cost import BlockCosts, CostMeasure
from .live import LiveBlocks, Replacement
from .saliency import block_saliency, saliency_order
from .similarity import nearest_blocks, pair_distances
from .typed import check_types, require


@dataclass(frozen=True)
class PlanConfig:
    """How a target's candidate replacements are found and ordered.

    ``candidates``: ``"aligned"`` (same tensor and position in the base) or ``"nearest"`` (the
    paper's nearest block by ``metric``). ``use_self``: also look for close blocks elsewhere (the
    target's own or the base's at other positions), admitted only within ``close_ratio`` of the
    aligned distance (``None``: no guard). ``order``: ``"cost"`` (by ``cost``, see :mod:`.cost`) or
    ``"saliency"`` (the paper's, by ``saliency``/``aggregate``). ``top_k``: nearest blocks looked
    at per block; ``method``: ``"exact"`` or ``"sketch"`` nearest-block search (very large
    families). ``fisher_micro_batch``/``fisher_max_examples``: how the empirical Fisher is
    estimated (1 = per example; ``None``: whole batches / every example). ``only_tensors``
    restricts replacements to these tensors (any iterable of names is kept as a frozenset).
    Bad values raise :class:`~hf_dpdedup.errors.ConfigError`.
    """

    candidates: Literal["aligned", "nearest"] = "aligned"
    order: Literal["cost", "saliency"] = "cost"
    cost: CostMeasure = "fisher"
    saliency: Literal["magnitude", "gradient", "fisher", "wanda"] = "magnitude"
    aggregate: Literal["mean", "l1", "l2", "linf", "q3"] = "mean"
    metric: Literal["l2", "l1", "cosine"] = "l2"
    top_k: int = 4
    use_self: bool = True
    close_ratio: float | None = 0.5
    method: Literal["exact", "sketch"] = "exact"
    fisher_micro_batch: int | None = 1
    fisher_max_examples: int | None = 512
    only_tensors: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.only_tensors is not None and not isinstance(self.only_tensors, (str, frozenset)):
            object.__setattr__(self, "only_tensors", frozenset(self.only_tensors))
        check_types(self)
        require(self.close_ratio is None or 0 <= self.close_ratio <= 1,
                f"PlanConfig.close_ratio must be in [0, 1] or None (no guard), got {self.close_ratio!r}.")
        require(self.top_k >= 1, f"PlanConfig.top_k must be ≥ 1, got {self.top_k}.")
        for name in ("fisher_micro_batch", "fisher_max_examples"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"PlanConfig.{name} must be ≥ 1 or None, got {value}.")


# blocks per chunk when costs are computed: one float64 [chunk, block_size] buffer of this size (and
# a few like it), reused for every chunk, whatever the model's size
_COST_CHUNK_BYTES = 16 * 1024 * 1024


def plan_replacements(
    target,
    live: LiveBlocks,
    base: BlockRows | torch.Tensor,
    config: PlanConfig,
    *,
    calibration=None,
    loss_fn=None,
) -> list[Replacement]:
    """Candidate replacements for ``target``, cheapest (or least salient) first.

    ``base`` holds the base's blocks: :class:`~hf_dpdedup.blocks.BlockRows` (views of its tensors)
    or a ``[n_blocks, block_size]`` matrix. With aligned candidates and ``use_self=False`` nothing
    of the size of a model is copied (rows are hashed and compared in place, costs computed in
    chunks, a replacement's row is a view of the base's block); looking for close blocks elsewhere
    (``use_self``, ``candidates="nearest"``) compares every block with every other and needs both
    block matrices in memory.
    """
    base_rows, target_rows = as_block_rows(base), live.rows
    n = len(target_rows)
    if n == 0:
        return []
    blocks = _searchable_blocks(live, target_rows, base_rows, config)
    if not blocks:
        return []
    choice = _choose_candidates(blocks, target_rows, base_rows, config)
    order = _order(target, live, blocks, choice, target_rows, base_rows, config, calibration, loss_fn)
    return _without_chains(order, choice, target_rows, base_rows)


def _searchable_blocks(live: LiveBlocks, target_rows: BlockRows, base_rows: BlockRows,
                       config: PlanConfig) -> list[int]:
    """Blocks worth a decision: not already equal to a base block, inside ``only_tensors``."""
    base_hashes = set(row_hashes(base_rows))
    skip = {i for i, h in enumerate(row_hashes(target_rows)) if h in base_hashes}
    n = len(target_rows)
    if config.only_tensors is not None:
        owners = live.layout.block_owner()
        skip |= {i for i in range(n) if owners[i][0] not in config.only_tensors}
    return [i for i in range(n) if i not in skip]


Choice = dict[int, list[tuple[str, int]]]  # block -> candidates ("base"|"self", row), best first


def _choose_candidates(blocks: list[int], target_rows: BlockRows, base_rows: BlockRows,
                       config: PlanConfig) -> Choice:
    """Each block's candidates, best first: the aligned base block and/or genuinely close others."""
    aligned = config.candidates == "aligned" and len(base_rows) == len(target_rows)
    if config.candidates == "aligned" and not aligned:
        raise ValueError("Aligned candidates need a base with the target's block layout; use candidates='nearest'.")
    choice: Choice = {b: [("base", b)] if aligned else [] for b in blocks}
    if not aligned or config.use_self:
        target_matrix, base_matrix = target_rows.matrix(), base_rows.matrix()  # every block against every other
        rows = torch.tensor(blocks)
        m = base_matrix.shape[0]
        parts = (base_matrix, target_matrix) if config.use_self else (base_matrix,)
        exclude = rows + m if config.use_self else None  # never a block's own match
        k = max(1, min(config.top_k, sum(p.shape[0] for p in parts) - 1))
        match = nearest_blocks(target_matrix[rows], parts, metric=config.metric, k=k, exclude_self=exclude,
                               method=config.method)
        bound = _close_bounds(rows, target_matrix, base_matrix, config) if aligned else None
        for pos, block in enumerate(blocks):
            others = []
            for cand, dist in zip(match.indices[pos].tolist(), match.distances[pos].tolist()):
                if cand < 0 or (aligned and cand == block):
                    continue
                if bound is not None and not dist <= bound[pos]:
                    continue
                others.append(("base", cand) if cand < m else ("self", cand - m))
            choice[block] = others + choice[block]
    return {b: c for b, c in choice.items() if c}


def _close_bounds(rows: torch.Tensor, target_matrix: torch.Tensor, base_matrix: torch.Tensor,
                  config: PlanConfig) -> torch.Tensor | None:
    """The distance a non-aligned candidate must not exceed: ``close_ratio`` × the smaller of the
    aligned distance and the block's own size (its distance to a zero block).

    The aligned distance alone is not enough: a small block whose aligned base block is far away
    would accept any other small block (two unrelated small blocks are about √2 × their norm apart,
    well under half a large aligned distance). Bounding by the block's own size as well means the
    candidate must be a near-copy of the block, whatever the norms."""
    if config.close_ratio is None:
        return None
    target = target_matrix[rows]
    aligned = pair_distances(target, base_matrix[rows], metric=config.metric)
    own = pair_distances(target, torch.zeros_like(target), metric=config.metric)
    return config.close_ratio * torch.minimum(aligned, own)


def _row(source: str, index: int, target_rows: BlockRows, base_rows: BlockRows) -> torch.Tensor:
    """A candidate's values: a view of the base's block (the base is never edited), a copy of the
    target's own (the target is edited while it is searched)."""
    return base_rows.row(index) if source == "base" else target_rows.take([index])[0]


def _order(target, live, blocks, choice: Choice, target_rows: BlockRows, base_rows: BlockRows,
           config: PlanConfig, calibration, loss_fn) -> list[int]:
    """The blocks that have a candidate, cheapest (or least salient) first; ties in block order."""
    ordered = [b for b in blocks if b in choice]
    if not ordered:
        return []
    if config.order == "saliency":
        scores = block_saliency(target, live.layout, measure=config.saliency, aggregate=config.aggregate,
                                calibration=calibration, loss_fn=loss_fn)
        rank = {b: i for i, b in enumerate(saliency_order(scores).tolist())}
        return sorted(ordered, key=rank.__getitem__)
    prepared = BlockCosts.prepare(target, live.layout, measure=config.cost, calibration=calibration,
                                  loss_fn=loss_fn, micro_batch=config.fisher_micro_batch,
                                  max_examples=config.fisher_max_examples)
    step = max(1, _COST_CHUNK_BYTES // (8 * live.block_size))
    # One set of chunk buffers for the whole loop: a fresh set per chunk made the allocator keep
    # (fragmented) memory growing with the model, 1.5 GiB at 1.1 B parameters.
    # (Mixed-dtype arithmetic would make a float64 temporary per chunk too: every operand is
    # converted into a float64 buffer first.)
    current = torch.empty(min(step, len(ordered)), live.block_size, dtype=target_rows.dtype)
    deltas, own = (torch.empty(current.shape, dtype=torch.float64) for _ in range(2))
    costs = []
    for start in range(0, len(ordered), step):  # ascending blocks: each tensor's factors read once
        chunk = ordered[start : start + step]
        d, n = deltas[: len(chunk)], len(chunk)
        torch.stack([_row(*choice[b][0], target_rows, base_rows) for b in chunk], out=current[:n])
        d.copy_(current[:n])
        own[:n].copy_(target_rows.take(chunk, out=current[:n]))
        costs.append(prepared.costs(chunk, d.sub_(own[:n])))  # candidate − current, in float64
    return [ordered[i] for i in torch.sort(torch.cat(costs), stable=True).indices.tolist()]


def _without_chains(order: list[int], choice: Choice, target_rows: BlockRows,
                    base_rows: BlockRows) -> list[Replacement]:
    planned: set[int] = set()
    pinned: set[int] = set()
    sequence: list[Replacement] = []
    for block in order:
        if block in pinned:
            continue  # the source of an earlier replacement: keeps its own values
        for source, index in choice[block]:
            if source == "self":
                if index == block or index in planned:
                    continue
                pinned.add(index)
            sequence.append(Replacement(block, source, index, _row(source, index, target_rows, base_rows)))
            planned.add(block)
            break
    return sequence
