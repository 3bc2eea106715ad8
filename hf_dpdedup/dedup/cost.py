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

from dataclasses import replace
from typing import Any, Iterable, Literal

import torch

from ..blocks import BlockLayout, to_block_matrix
from ..errors import CalibrationRequiredError
from .saliency import LossFn, gradient_moments, input_rms, scale_by_input_rms

CostMeasure = Literal["taylor", "fisher", "wanda", "delta"]
COSTS: tuple[str, ...] = ("taylor", "fisher", "wanda", "delta")


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
    """Estimated loss increase (float64) of replacing block ``blocks[i]`` by adding ``deltas[i]``.

    ``blocks`` are row indices into ``layout``; ``deltas`` the ``[len(blocks), block_size]`` changes
    (candidate − current, zero in a last block's padding).
    """
    if measure not in COSTS:
        raise ValueError(f"Unknown cost measure {measure!r}; use one of {COSTS}.")
    d = deltas.to(torch.float64)
    if measure == "delta":
        return d.square().sum(1)
    if calibration is None:
        raise CalibrationRequiredError(
            f"The {measure!r} cost needs PUBLIC calibration batches (DedupData.calibration); "
            "use cost='delta', which needs no data."
        )
    as_rows = replace(layout, dtype="float32")
    if measure == "wanda":
        batches = list(calibration)
        named = model.state_dict(keep_vars=True)
        rms = input_rms(model, {s.name: named[s.name] for s in layout.tensors}, batches, loss_fn)
        ones = {s.name: scale_by_input_rms(torch.ones(s.shape), rms.get(s.name)) for s in layout.tensors}
        scale = to_block_matrix(ones, as_rows)[blocks].to(torch.float64)
        return (d * scale).square().sum(1)
    mean, fisher = gradient_moments(model, layout, calibration, loss_fn=loss_fn, micro_batch=micro_batch,
                                    max_examples=max_examples)
    second = 0.5 * (to_block_matrix(fisher, as_rows)[blocks].to(torch.float64) * d.square()).sum(1)
    if measure == "fisher":
        return second
    first = (to_block_matrix(mean, as_rows)[blocks].to(torch.float64) * d).sum(1)
    return first + second
