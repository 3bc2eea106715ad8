"""Block-level edits of a live model, in place, with exact undo.

The search applies groups of replacements to the model it validates and reverts the groups the
validator rejects. Nothing is reloaded: each block is a slice of a parameter's storage, a
replacement copies the new values into that slice, and the original values are kept to restore
them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import BlockLayout, BlockRows, plan_layout


@dataclass(frozen=True)
class Replacement:
    """Replace target block ``block`` by ``source``'s block ``source_block`` (values in ``row``)."""

    block: int
    source: str  # "base" or "self"
    source_block: int
    row: torch.Tensor  # [block_size], already in the target's dtype


class LiveBlocks:
    """Views of a model's blocks in its parameters; ``apply`` returns what ``revert`` needs."""

    def __init__(self, model: torch.nn.Module, block_size: int) -> None:
        state = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
        self.layout: BlockLayout = plan_layout(state, block_size)
        self.block_size = block_size
        self.rows = BlockRows.of(state, self.layout)  # views of the parameters: edits show through

    @property
    def n_blocks(self) -> int:
        return len(self.rows)

    def _slice(self, block: int) -> torch.Tensor:
        return self.rows.part(block)

    def read(self, block: int) -> torch.Tensor:
        """A copy of the block, zero-padded to ``block_size``."""
        return self.rows.take([block])[0]

    def matrix(self) -> torch.Tensor:
        return self.rows.matrix() if self.n_blocks else torch.empty(0)

    @torch.no_grad()
    def apply(self, replacements: list[Replacement]) -> list[tuple[int, torch.Tensor]]:
        undo = []
        for rep in replacements:
            part = self._slice(rep.block)
            undo.append((rep.block, part.clone()))
            part.copy_(rep.row[: part.numel()])
        return undo

    @torch.no_grad()
    def revert(self, undo: list[tuple[int, torch.Tensor]]) -> None:
        for block, values in reversed(undo):
            self._slice(block).copy_(values)


Decision = tuple[int, str, int]  # (block, "base" | "self", source block): a replacement without its values


def apply_decisions(model: torch.nn.Module, base: torch.nn.Module, decisions: list[Decision],
                    block_size: int) -> None:
    """Re-apply kept replacements, given as (block, source, source block), to an unedited ``model``.

    Sources are never replaced themselves (the plan pins them), so reading them now reads the
    values the search used: the result is bit-identical to the searched model.
    """
    live = LiveBlocks(model, block_size)
    base_rows = LiveBlocks(base, block_size).rows  # views: the base is not edited
    live.apply([Replacement(block, source, source_block,
                            base_rows.row(source_block) if source == "base" else live.read(source_block))
                for block, source, source_block in decisions])
