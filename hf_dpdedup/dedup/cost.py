"""What a replacement is expected to cost: the order in which the search tries them.

A replacement moves a target block ``w`` to a candidate ``c``; the change is ``Δ = c − w``. The
paper orders blocks by their own saliency, which ignores how far the replacement moves the weights.
Here each replacement is scored by an estimate of the loss increase it causes, cheapest first:

* ``"taylor"``: ``Σ g·Δ + ½ Σ F·Δ²`` — first- and second-order Taylor terms, ``g`` the mean
  gradient and ``F`` the empirical Fisher diagonal on PUBLIC calibration data (the Fisher stands
  in for the Hessian, as in Optimal Brain Damage/Surgeon and Fisher merging);
* ``"fisher"``: ``½ Σ F·Δ²`` (the second-order term alone; insensitive to gradient noise);
* ``"wanda"``: ``Σ (Δ · rms(x))²`` with ``rms(x)`` the RMS of the input feature each weight
  multiplies (no gradients; forward passes on calibration data only);
* ``"delta"``: ``Σ Δ²`` (no data at all).

Costs are per block and additive, the diagonal approximation every one of these methods makes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from ..blocks import BlockLayout
from ..errors import CalibrationRequiredError
from .saliency import LossFn, gradient_moments, input_rms

CostMeasure = Literal["taylor", "fisher", "wanda", "delta"]
COSTS: tuple[str, ...] = ("taylor", "fisher", "wanda", "delta")


class BlockCosts:
    """A cost measure prepared once for a model (its Fisher, gradient or input RMS measured), then
    applied to any number of replacement chunks: ``costs(blocks, deltas)``.

    The per-weight factors are read one tensor at a time, as the chunks reach them, so the float32
    copy of the whole model that a ``[n_blocks, block_size]`` factor matrix would be never exists
    (the Fisher and the mean gradient themselves are one float32 tensor per trained weight).
    """

    def __init__(self, layout: BlockLayout, measure: CostMeasure,
                 factors: dict[str, _TensorRows | _ScaleRows]) -> None:
        self.layout, self.measure = layout, measure
        self._factors = factors  # block rows of each per-weight factor the measure needs
        self._buffers: dict[str, torch.Tensor] = {}  # work buffers reused across chunks of one size

    @classmethod
    def prepare(
        cls,
        model: torch.nn.Module,
        layout: BlockLayout,
        *,
        measure: CostMeasure = "taylor",
        calibration: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        micro_batch: int | None = 1,
        max_examples: int | None = 512,
    ) -> "BlockCosts":
        """Measure what ``measure`` needs on PUBLIC ``calibration`` batches (nothing for ``"delta"``)."""
        if measure not in COSTS:
            raise ValueError(f"Unknown cost measure {measure!r}; use one of {COSTS}.")
        if measure == "delta":
            return cls(layout, measure, {})
        if calibration is None:
            raise CalibrationRequiredError(
                f"The {measure!r} cost needs PUBLIC calibration batches (DedupData.calibration); "
                "use cost='delta', which needs no data."
            )
        if measure == "wanda":
            named = model.state_dict(keep_vars=True)
            rms = input_rms(model, {s.name: named[s.name] for s in layout.tensors}, list(calibration), loss_fn)
            return cls(layout, measure, {"scale": _ScaleRows(layout, rms)})
        mean, fisher = gradient_moments(model, layout, calibration, loss_fn=loss_fn, micro_batch=micro_batch,
                                        max_examples=max_examples)
        factors = {"fisher": _TensorRows(layout, fisher.__getitem__)}
        if measure == "taylor":
            factors["mean"] = _TensorRows(layout, mean.__getitem__)
        return cls(layout, measure, factors)

    def costs(self, blocks: Sequence[int], deltas: torch.Tensor) -> torch.Tensor:
        """Estimated loss increase (float64) of adding ``deltas[i]`` to block ``blocks[i]``
        (``deltas``: ``[len(blocks), block_size]``, candidate − current, zero in a last block's padding)."""
        d = deltas.to(torch.float64)
        # The same operations as (f · d)².sum(1), ½ (F · d²).sum(1), (g · d).sum(1) on fresh tensors,
        # written into buffers kept for the next chunk (fresh ones per chunk fragment the heap).
        work = self._buffer("work", d.shape, torch.float64)
        if self.measure == "delta":
            return torch.square(d, out=work).sum(1)
        if self.measure == "wanda":
            return torch.mul(d, self._factor("scale", blocks), out=work).square_().sum(1)
        second = 0.5 * torch.square(d, out=work).mul_(self._factor("fisher", blocks)).sum(1)
        if self.measure == "fisher":
            return second
        return torch.mul(self._factor("mean", blocks), d, out=work).sum(1) + second

    def _buffer(self, key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
            buffer = self._buffers[key] = torch.empty(shape, dtype=dtype)
        return buffer[: shape[0]]

    def _factor(self, key: str, blocks: Sequence[int]) -> torch.Tensor:
        """The per-weight factor ``key`` of ``blocks`` (float32 values, zero in padding) as float64,
        in kept buffers (so no operation mixes dtypes: that would make a temporary)."""
        shape = torch.Size((len(blocks), self.layout.block_size))
        values = self._factors[key].take(blocks, out=self._buffer(key, shape, torch.float32))
        return self._buffer(key + "64", shape, torch.float64).copy_(values)


class _TensorRows:
    """Block rows (float32) of per-tensor values computed on demand, one tensor held at a time:
    chunks of ascending blocks reach each tensor once."""

    def __init__(self, layout: BlockLayout, values: Callable[[str], torch.Tensor]) -> None:
        self.layout, self.values = layout, values
        self.owner = layout.block_owner()
        self._name: str | None = None
        self._flat = torch.empty(0)

    def take(self, blocks: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        bs = self.layout.block_size
        for k, block in enumerate(blocks):
            name, j = self.owner[block]
            if name != self._name:
                self._name, self._flat = name, self.values(name).detach().reshape(-1).to(torch.float32)
            part = self._flat[j * bs : (j + 1) * bs]
            out[k, : part.numel()] = part
            out[k, part.numel():] = 0
        return out


class _ScaleRows:
    """Block rows (float32) of the Wanda factor — each weight's input-feature RMS (1 where a tensor
    has none) — computed per block from the RMS vectors: no weight-sized tensor is ever made."""

    def __init__(self, layout: BlockLayout, rms: dict[str, tuple[torch.Tensor, int]]) -> None:
        self.layout, self.rms = layout, rms
        self.owner = layout.block_owner()
        self.specs = {s.name: s for s in layout.tensors}

    def take(self, blocks: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        bs = self.layout.block_size
        for k, block in enumerate(blocks):
            name, j = self.owner[block]
            numel = math.prod(self.specs[name].shape)
            count = min(bs, numel - j * bs)
            out[k, count:] = 0
            if name not in self.rms:
                out[k, :count] = 1.0
                continue
            scale, dim = self.rms[name]
            _fill_broadcast(out[k, :count], scale, dim, j * bs, self.specs[name].shape[-1])
        return out


def _fill_broadcast(row: torch.Tensor, scale: torch.Tensor, dim: int, offset: int, columns: int) -> None:
    """``row[i]`` = the factor at flat index ``offset + i`` of a ``[rows, columns]`` weight:
    ``scale[column]`` (``dim`` 1, nn.Linear) or ``scale[row]`` (``dim`` 0, Conv1D). Written as a
    partial first row, whole rows (broadcast views) and a partial last row: no index tensors."""
    count, i = row.numel(), 0
    r, c = divmod(offset, columns)
    if c:
        n = min(columns - c, count)
        row[:n] = scale[c : c + n] if dim == 1 else scale[r]
        i, r = i + n, r + 1
    full = (count - i) // columns
    if full:
        whole = row[i : i + full * columns].view(full, columns)
        whole.copy_(scale[None, :].expand(full, columns) if dim == 1 else scale[r : r + full, None].expand(full, columns))
        i, r = i + full * columns, r + full
    if i < count:
        row[i:] = scale[: count - i] if dim == 1 else scale[r]


def replacement_costs(
    model: torch.nn.Module,
    layout: BlockLayout,
    blocks: torch.Tensor,
    deltas: torch.Tensor,
    *,
    measure: CostMeasure = "taylor",
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    micro_batch: int | None = 1,
    max_examples: int | None = 512,
) -> torch.Tensor:
    """Estimated loss increase (float64) of replacing block ``blocks[i]`` by adding ``deltas[i]``
    (:meth:`BlockCosts.prepare` then :meth:`BlockCosts.costs`, for one chunk).

    ``blocks`` are row indices into ``layout``; ``deltas`` the ``[len(blocks), block_size]`` changes
    (candidate − current, zero in a last block's padding).
    """
    prepared = BlockCosts.prepare(model, layout, measure=measure, calibration=calibration, loss_fn=loss_fn,
                                  micro_batch=micro_batch, max_examples=max_examples)
    return prepared.costs(torch.as_tensor(blocks).tolist(), deltas)
