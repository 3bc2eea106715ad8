"""Block layout: cut a state dict into fixed-size blocks and rebuild it exactly.

Every floating-point tensor with at least ``block_size`` elements is flattened and cut into
``ceil(numel / block_size)`` rows of a ``[n_blocks, block_size]`` matrix, the last row zero-padded.
Smaller tensors (biases, norms) and non-floating tensors stay whole as *extras*. Tensors that share
storage (tied weights) are laid out once, under their first name, and the other names are recorded
as aliases so the rebuild can tie them again.

The layout is pure bookkeeping: it never changes a value and never changes a dtype, so
``rebuild(cut(sd))`` is bit-identical to ``sd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import BlockLayoutError, DtypeMismatchError

#: dtypes a family's blocks may have (one per family).
BLOCK_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return BLOCK_DTYPES[name]
    except KeyError:
        raise BlockLayoutError(
            f"Unsupported block dtype {name!r}; use one of {sorted(BLOCK_DTYPES)}."
        ) from None


def check_block_size(block_size: object) -> int:
    """Return ``block_size`` if it is a positive integer, else raise a :class:`BlockLayoutError`."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise BlockLayoutError(
            f"block_size must be a positive integer (e.g. 65536), got {block_size!r}."
        )
    return block_size


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in a model's block matrix: rows ``[first_block, first_block+n_blocks)``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    first_block: int
    n_blocks: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BlockLayout:
    """The block layout of one model: which tensors are blocks, which are extras, which are aliases."""

    block_size: int
    dtype: str
    tensors: tuple[TensorSpec, ...]  # in block order
    extras: tuple[str, ...]
    aliases: Mapping[str, str]  # alias name -> canonical name

    @property
    def n_blocks(self) -> int:
        return sum(t.n_blocks for t in self.tensors)

    def block_owner(self) -> list[tuple[str, int]]:
        """For each block row, the tensor name and the index of the block inside that tensor."""
        return [(t.name, i) for t in self.tensors for i in range(t.n_blocks)]


def plan_layout(state_dict: Mapping[str, torch.Tensor], block_size: int) -> BlockLayout:
    """Decide which tensors are cut into blocks, which stay extras and which are tied aliases."""
    check_block_size(block_size)
    aliases = find_aliases(state_dict)
    specs: list[TensorSpec] = []
    extras: list[str] = []
    block_dtype: torch.dtype | None = None
    next_block = 0
    for name, tensor in state_dict.items():
        if name in aliases:
            continue
        if not tensor.is_floating_point() or tensor.numel() < block_size:
            extras.append(name)
            continue
        if tensor.dtype not in BLOCK_DTYPES.values():
            raise DtypeMismatchError(
                f"Tensor {name!r} has dtype {tensor.dtype}; blocks support {sorted(BLOCK_DTYPES)}. "
                "Convert the model first, e.g. model.to(torch.bfloat16)."
            )
        if block_dtype is None:
            block_dtype = tensor.dtype
        elif tensor.dtype != block_dtype:
            raise DtypeMismatchError(
                f"Tensor {name!r} is {tensor.dtype} but earlier tensors are {block_dtype}: a model's "
                "blocks must share one dtype. Convert the whole model with model.to(dtype) first."
            )
        n = math.ceil(tensor.numel() / block_size)
        specs.append(TensorSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype), next_block, n))
        next_block += n
    dtype = dtype_name(block_dtype) if block_dtype is not None else _extras_dtype(state_dict, extras)
    return BlockLayout(block_size, dtype, tuple(specs), tuple(extras), dict(aliases))


#: the block tensor that a member's small floating extras are packed into (see :func:`pack_extras`);
#: no transformers module names a tensor so (a state dict that does is refused)
PACKED_EXTRAS = "hf_dpdedup:packed_extras"


@dataclass(frozen=True)
class PackedTensor:
    """One extra packed into :data:`PACKED_EXTRAS`: its values are ``flat[offset : offset + numel]``."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def pack_extras(state_dict: Mapping[str, torch.Tensor], layout: BlockLayout
                ) -> tuple[BlockLayout, Mapping[str, torch.Tensor], tuple[PackedTensor, ...]]:
    """Pack the layout's small floating extras of the block dtype into one more block tensor.

    Biases and norms are extras (smaller than a block); stored whole, every member repeats them,
    even when they equal the base's (an adapter member's, a frozen LayerNorm's). Packed in layout
    order into :data:`PACKED_EXTRAS`, they become rows like any block: content-addressed, shared
    between members whose packed values agree row by row, and coded with the shards. Extras of
    another dtype (integer buffers, a float16 tensor in a float32 model) stay extras. Returns the
    layout with the packed tensor appended (its extras list without the packed ones), the state
    dict with the packed tensor added (the others by reference) and what was packed where."""
    if PACKED_EXTRAS in state_dict:
        raise BlockLayoutError(f"A state dict may not hold a tensor named {PACKED_EXTRAS!r} (reserved by hf_dpdedup).")
    dtype = parse_dtype(layout.dtype)
    names = [n for n in layout.extras if state_dict[n].dtype == dtype and state_dict[n].numel() > 0]
    if not names:
        return layout, state_dict, ()
    packed, offset = [], 0
    for name in names:
        packed.append(PackedTensor(name, tuple(state_dict[name].shape), offset))
        offset += state_dict[name].numel()
    flat = torch.cat([state_dict[n].detach().reshape(-1) for n in names])
    spec = TensorSpec(PACKED_EXTRAS, (offset,), layout.dtype, layout.n_blocks, math.ceil(offset / layout.block_size))
    packed_names = set(names)
    kept = tuple(n for n in layout.extras if n not in packed_names)
    packed_layout = BlockLayout(layout.block_size, layout.dtype, (*layout.tensors, spec), kept, layout.aliases)
    return packed_layout, {**state_dict, PACKED_EXTRAS: flat}, tuple(packed)


def unpack_extras(flat: torch.Tensor, packed: tuple[PackedTensor, ...]) -> dict[str, torch.Tensor]:
    """The packed extras of :data:`PACKED_EXTRAS`'s values, each a copy in memory of its own."""
    return {p.name: flat[p.offset : p.offset + p.numel].reshape(p.shape).clone() for p in packed}


def _extras_dtype(state_dict: Mapping[str, torch.Tensor], extras: list[str]) -> str:
    # A model with no tensor large enough for a block: its dtype is that of its floating tensors.
    for name in extras:
        if state_dict[name].dtype in BLOCK_DTYPES.values():
            return dtype_name(state_dict[name].dtype)
    return "float32"


def find_aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the very same view of storage as an earlier name's (tied weights)."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if tensor.device.type == "meta":
            raise BlockLayoutError(
                f"Tensor {name!r} is on the meta device (no data): load the model's weights first."
            )
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def to_block_matrix(state_dict: Mapping[str, torch.Tensor], layout: BlockLayout) -> torch.Tensor:
    """The ``[n_blocks, block_size]`` matrix of a state dict's block tensors, last blocks zero-padded."""
    matrix = torch.zeros(layout.n_blocks, layout.block_size, dtype=parse_dtype(layout.dtype))
    flat = matrix.view(-1)
    for spec in layout.tensors:
        start = spec.first_block * layout.block_size
        flat[start : start + spec.numel].copy_(state_dict[spec.name].detach().reshape(-1))
    return matrix


class BlockRows:
    """The ``[n_blocks, block_size]`` rows of a state dict's block tensors, without building the matrix.

    A full block is a view of its tensor's storage (no copy); only a tensor's zero-padded last block
    is copied when asked for. Everything that walks a whole model's blocks (hashing, storing,
    planning) reads them through this, so its memory stays one block chunk, not one model: what
    makes deduplicating an LLM-sized member fit next to the model itself. A matrix is a special
    case (``BlockRows.of_matrix``). Views follow the tensors they view: edit the tensors and the
    rows change too (take a copy with :meth:`take` to keep values).
    """

    def __init__(self, pieces: list[tuple[torch.Tensor, int, int]], block_size: int, dtype: torch.dtype) -> None:
        self._pieces = pieces  # per block: flat tensor, start offset, number of real elements
        self.block_size = block_size
        self.dtype = dtype

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor], layout: BlockLayout) -> "BlockRows":
        """The rows of ``state_dict``'s block tensors in ``layout``'s order (tensors must be contiguous)."""
        pieces = []
        bs = layout.block_size
        for spec in layout.tensors:
            tensor = state_dict[spec.name].detach()
            if not tensor.is_contiguous():
                raise BlockLayoutError(f"{spec.name} is not contiguous; call model.to(...) or clone it first.")
            flat = tensor.view(-1)
            pieces.extend((flat, i * bs, min(bs, spec.numel - i * bs)) for i in range(spec.n_blocks))
        return cls(pieces, bs, parse_dtype(layout.dtype))

    @classmethod
    def of_matrix(cls, matrix: torch.Tensor) -> "BlockRows":
        n, bs = matrix.shape
        flat = matrix.detach().contiguous().view(-1)
        return cls([(flat, i * bs, bs) for i in range(n)], bs, matrix.dtype)

    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self._pieces), self.block_size)

    def part(self, i: int) -> torch.Tensor:
        """The real elements of block ``i`` (no padding): a view of its tensor."""
        flat, start, count = self._pieces[i]
        return flat[start : start + count]

    def row(self, i: int) -> torch.Tensor:
        """Row ``i``: a view of the tensor where the block is full, else a zero-padded copy."""
        flat, start, count = self._pieces[i]
        if count == self.block_size:
            return flat[start : start + count]
        row = torch.zeros(self.block_size, dtype=flat.dtype)
        row[:count] = flat[start : start + count]
        return row

    def take(self, indices, out: torch.Tensor | None = None) -> torch.Tensor:
        """A ``[len(indices), block_size]`` copy of the rows ``indices`` (into ``out`` when given:
        a buffer of that shape reused across calls, any dtype the values convert to)."""
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        if out is None:
            out = torch.zeros(len(indices), self.block_size, dtype=self.dtype)
        elif tuple(out.shape) != (len(indices), self.block_size):
            raise ValueError(f"out must be [{len(indices)}, {self.block_size}], got {list(out.shape)}.")
        for k, i in enumerate(indices):
            flat, start, count = self._pieces[i]
            out[k, :count] = flat[start : start + count]
            if count < self.block_size:
                out[k, count:] = 0
        return out

    def matrix(self) -> torch.Tensor:
        """The whole matrix (a copy: one model's bytes)."""
        return self.take(range(len(self)))


def as_block_rows(rows: "BlockRows | torch.Tensor") -> BlockRows:
    """``rows`` itself, or a ``[n, block_size]`` matrix seen as :class:`BlockRows`."""
    return rows if isinstance(rows, BlockRows) else BlockRows.of_matrix(rows)


def tensor_from_rows(rows: torch.Tensor, spec_shape: tuple[int, ...]) -> torch.Tensor:
    """Undo the cut for one tensor: ``rows`` is its ``[n, block_size]`` blocks in order."""
    numel = math.prod(spec_shape)
    n, block_size = rows.shape
    if n != math.ceil(numel / block_size):
        raise BlockLayoutError(
            f"{n} blocks of size {block_size} cannot rebuild a tensor of shape {list(spec_shape)} "
            f"({numel} elements need {math.ceil(numel / block_size)} blocks)."
        )
    return rows.reshape(-1)[:numel].view(spec_shape)
