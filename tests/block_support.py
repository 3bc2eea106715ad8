"""Test-only helpers on blocks: the inverse of :func:`hf_dpdedup.blocks.to_block_matrix` (the state
dict a block matrix, its layout and the extras stand for; the library rebuilds members from the store
instead), a constitution's row ids one per block, models whose small tensors are their own, and a
store's index rewritten as the formats before ``hf_dpdedup/3`` wrote it (row hashes listed), and a
format-4 constitution rewritten as format 3 wrote it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Mapping

import torch

from hf_dpdedup.blocks import PACKED_EXTRAS, BlockLayout, tensor_from_rows
from hf_dpdedup.store import BlockStore
from hf_dpdedup.store.constitution import decode_rows
from hf_dpdedup.store.format import INDEX_FILE
from hf_dpdedup.store.io import atomic_write_json


def rebuild_from_matrix(
    matrix: torch.Tensor, layout: BlockLayout, extras: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_block_matrix` plus the extras and aliases: the original state dict."""
    out: dict[str, torch.Tensor] = {}
    for spec in layout.tensors:
        rows = matrix[spec.first_block : spec.first_block + spec.n_blocks]
        out[spec.name] = tensor_from_rows(rows, spec.shape)
    out.update(extras)
    for alias, canonical in layout.aliases.items():
        out[alias] = out[canonical]
    return out


def plain_rows(constitution: dict) -> list[int]:
    """The first tensor's row ids, one per block (as written, runs are ``[first, count]`` pairs)."""
    return list(decode_rows(constitution["tensors"][0]["rows"], "first"))


def with_own_small_tensors(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """``model`` with its biases and norms moved off their initial values (zeros, ones), so that its
    packed extras share no row with another member's, nor with each other."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


def list_row_hashes(store: BlockStore) -> BlockStore:
    """Rewrite ``store``'s index as an ``hf_dpdedup/1`` (raw) or ``/2`` (coded) store has it, with
    every row's sha256 listed, and open it again."""
    index = replace(store.index, row_hashes=tuple(store.stored_row_hashes()))
    atomic_write_json(store.path / INDEX_FILE, index.to_dict())
    return BlockStore.open(store.path)


def as_format_3(data: dict) -> dict:
    """A format-4 constitution as format 3 wrote it: every entry with its dtype and numel, every packed
    extra with its offset, whole names."""
    out = json.loads(json.dumps(data))
    prefix = out.pop("name_prefix", "")
    whole = lambda n: n if n == PACKED_EXTRAS else prefix + n  # noqa: E731
    out["format"] = "hf_dpdedup/3"
    out["tensors"] = [{"name": whole(t["name"]), "shape": t["shape"], "dtype": out["dtype"],
                       "numel": math.prod(t["shape"]), "rows": t["rows"]} for t in out["tensors"]]
    offset = 0
    for p in out.get("packed_extras", []):
        p["name"], p["offset"] = whole(p["name"]), offset
        offset += math.prod(p["shape"])
    out["extras"]["tensors"] = [whole(n) for n in out["extras"]["tensors"]]
    out["aliases"] = {whole(a): whole(c) for a, c in out["aliases"].items()}
    return out
