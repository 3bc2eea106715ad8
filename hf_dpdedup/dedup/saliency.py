"""Block saliency: how much each block of a model matters, so the least salient go first.

Element measures (``MEASURES``):

* ``"magnitude"``: ``|W|``. Needs no data; ``model`` may also be a state dict.
* ``"gradient"``: ``mean_b |∂L_b/∂W|`` over calibration batches ``b`` (the paper adds it because
  squared gradients of large models underflow).
* ``"fisher"``: ``mean_b (∂L_b/∂W)²``, the empirical Fisher with batch gradients.
* ``"wanda"``: ``|W_ij| · rms(X_j)`` for the weight of every ``nn.Linear`` (and transformers'
  ``Conv1D``), ``X_j`` the j-th input feature of the layer over all calibration tokens. We use the
  RMS (L2 norm / √rows) rather than the raw L2 norm: the ordering inside a layer is Wanda's, but a
  classifier head that sees one row per example is not ranked √seq_len lower than the encoder, and
  scores do not grow with the amount of calibration data. Tensors that are no Linear weight
  (embeddings, convolutions) fall back to ``|W|``, which is also what Wanda reduces to for a
  layer whose inputs have unit RMS (layer-normed activations).

Block scores (``AGGREGATES``): ``"mean"``, ``"l1"``, ``"l2"``, ``"linf"`` or ``"q3"`` (third quartile)
of the element scores, over the *valid* elements of each block only: the zero padding of a
tensor's last block is never counted.

Memory: gradient measures keep one float32 accumulator per block tensor (one float32 copy of the
blocked weights) on the model's device; magnitude and the aggregation work a few rows at a time.

Privacy: data-driven measures read ``calibration``, which must be PUBLIC data. A
:class:`~hf_dpdedup.privacy.PrivateDataset` (or a loader over one) is refused with
:class:`~hf_dpdedup.errors.PrivateDataAccessError` before any of its data is touched: saliency on
private data would be an uncharged release.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Mapping

import torch
from transformers.pytorch_utils import Conv1D  # GPT-2's Linear, weight stored [in, out]

from ..blocks import BlockLayout
from ..errors import CalibrationRequiredError, PrivateDataAccessError, SaliencyError
from ..privacy import PrivateDataset

MEASURES = ("magnitude", "gradient", "fisher", "wanda")
AGGREGATES = ("mean", "l1", "l2", "linf", "q3")
_ROWS_ELEMENTS = 2**22  # element scores aggregated at a time (bounds the float64 temporaries)

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def block_saliency(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    layout: BlockLayout,
    *,
    measure: str = "magnitude",
    aggregate: str = "mean",
    calibration: Iterable[Mapping[str, Any]] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
) -> torch.Tensor:
    """One float64 score per block of ``layout`` (lower = less salient).

    ``calibration`` yields model-input dicts of PUBLIC data; for ``"gradient"``/``"fisher"`` they
    carry labels so that ``model(**batch).loss`` exists, or pass ``loss_fn(model, batch) -> scalar``.
    The model is left as found: train/eval modes, ``requires_grad`` flags and ``.grad`` restored,
    hooks removed.

    >>> import torch
    >>> from hf_dpdedup.blocks import plan_layout
    >>> sd = {"w": torch.tensor([1.0, -3.0, 2.0])}
    >>> block_saliency(sd, plan_layout(sd, 2)).tolist()  # blocks [1, -3] and [2] (+ padding)
    [2.0, 2.0]
    """
    if measure not in MEASURES:
        raise SaliencyError(f"Unknown saliency measure {measure!r}; use one of {MEASURES}.")
    if aggregate not in AGGREGATES:
        raise SaliencyError(f"Unknown aggregate {aggregate!r}; use one of {AGGREGATES}.")
    if measure == "magnitude":
        named = model if isinstance(model, Mapping) else model.state_dict()
        return aggregate_blocks(_layout_tensors(named, layout), layout, aggregate)
    if not isinstance(model, torch.nn.Module):
        raise SaliencyError(f"Measure {measure!r} runs the model: pass the nn.Module, not a state dict.")
    batches = _public_batches(calibration, measure, max_batches)
    tensors = _layout_tensors(model.state_dict(keep_vars=True), layout)  # Parameters, for .grad
    if measure == "wanda":
        scores = _wanda(model, tensors, batches, loss_fn)
    else:
        scores = _gradients(model, tensors, batches, loss_fn, square=measure == "fisher")
    out = aggregate_blocks(scores, layout, aggregate)
    if not bool(torch.isfinite(out).all()):
        raise SaliencyError(f"{measure} saliency is not finite: the calibration loss or activations overflowed.")
    return out


def saliency_order(scores: torch.Tensor) -> torch.Tensor:
    """Block indices, least salient first; equal scores in block order (NaN, if any, last)."""
    return torch.sort(scores, stable=True).indices


@torch.no_grad()
def aggregate_blocks(scores: Mapping[str, torch.Tensor], layout: BlockLayout, aggregate: str) -> torch.Tensor:
    """Block scores from element scores (taken in absolute value), one tensor per layout tensor."""
    out = torch.empty(layout.n_blocks, dtype=torch.float64)
    bs = layout.block_size
    for spec in layout.tensors:
        flat = scores[spec.name].reshape(-1)
        full = spec.numel // bs
        rows = max(1, _ROWS_ELEMENTS // bs)
        for r0 in range(0, full, rows):
            r1 = min(full, r0 + rows)
            out[spec.first_block + r0 : spec.first_block + r1] = _aggregate(flat[r0 * bs : r1 * bs].view(-1, bs), aggregate)
        if spec.numel % bs:  # the last block's valid elements only: its zero padding is not data
            out[spec.first_block + full] = _aggregate(flat[full * bs :].view(1, -1), aggregate)[0]
    return out


def _layout_tensors(named: Mapping[str, torch.Tensor], layout: BlockLayout) -> dict[str, torch.Tensor]:
    missing = [s.name for s in layout.tensors if s.name not in named or named[s.name].numel() != s.numel]
    if missing:
        raise SaliencyError(
            f"The layout does not fit this model ({missing[:3]} missing or of another size): plan the "
            "layout from this model's own state_dict()."
        )
    return {s.name: named[s.name] for s in layout.tensors}


def _aggregate(rows: torch.Tensor, how: str) -> torch.Tensor:
    x = rows.to(torch.float64).abs()
    if how == "mean":
        return x.mean(1)
    if how == "l1":
        return x.sum(1)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=1)
    if how == "linf":
        return x.amax(1)
    return torch.quantile(x, 0.75, dim=1)  # "q3"; rows hold ≤ 2^22 elements, under quantile's limit


# --- calibration data ---------------------------------------------------------------------------
def _public_batches(calibration: Any, measure: str, max_batches: int | None) -> list[Any]:
    if isinstance(calibration, PrivateDataset) or isinstance(getattr(calibration, "dataset", None), PrivateDataset):
        # Checked by type only: iterating would already count as a refused raw access.
        raise PrivateDataAccessError(
            f"{measure} saliency on a private data set would release private information without "
            "charging it. Pass PUBLIC calibration batches (e.g. a public split of the task), or "
            "use measure='magnitude', which needs no data."
        )
    if calibration is None:
        raise CalibrationRequiredError(
            f"Saliency measure {measure!r} needs calibration data: pass calibration=<iterable of "
            "model-input dicts from a PUBLIC data set> (with labels for gradient/fisher), or use "
            "measure='magnitude'."
        )
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise SaliencyError(f"max_batches must be a positive integer or None, got {max_batches!r}.")
    batches = []
    for batch in calibration:
        if max_batches is not None and len(batches) == max_batches:
            break
        batches.append(batch)
    if not batches:
        raise CalibrationRequiredError(f"The calibration data for {measure!r} saliency yielded no batch.")
    return batches


def _run(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None) -> Any:
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, Mapping):
        raise SaliencyError(
            f"A calibration batch is a {type(batch).__name__}; without loss_fn each batch must be a dict "
            "of model inputs (model(**batch)). Pass loss_fn(model, batch) for other batch types."
        )
    return model(**batch)


@contextmanager
def _calibrating(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Eval mode, gradients only for ``params``; every mode, flag and ``.grad`` restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    wanted = {id(p) for p in params}
    # transformers' classification heads set config.problem_type on their first loss: calibrating
    # must not change what the member's config.json will say
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    try:
        model.eval()  # no dropout: saliency must not depend on random masks
        for p, _, _ in flags:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield
    finally:
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in modes:
            m.training = training
        if config is not None and hasattr(config, "problem_type"):
            config.problem_type = problem_type


def _gradients(model, tensors, batches, loss_fn, *, square: bool) -> dict[str, torch.Tensor]:
    params = {n: t for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    with _calibrating(model, list(params.values())), torch.enable_grad():
        for batch in batches:
            _scalar_loss(model, batch, loss_fn).backward()
            for n, p in params.items():
                if p.grad is not None:
                    g = p.grad.detach().float()
                    acc[n] += g.square() if square else g.abs()
                p.grad = None  # no gradient of (public) data left on the model
    for a in acc.values():
        a /= len(batches)
    # A buffer has no gradient and no known influence: rank it with the most salient, i.e. last.
    top = max((float(a.abs().max()) for a in acc.values() if a.numel()), default=0.0)
    return {n: acc[n] if n in acc else torch.full(t.shape, top) for n, t in tensors.items()}


def _wanda(model, tensors, batches, loss_fn) -> Mapping[str, torch.Tensor]:
    rms = input_rms(model, tensors, batches, loss_fn)

    def score(name: str) -> torch.Tensor:  # per tensor, on demand: no float32 copy of the whole model
        return scale_by_input_rms(tensors[name].detach().abs().float(), rms.get(name))

    return _Lazy(score, list(tensors))


def input_rms(model, tensors: Mapping[str, torch.Tensor], batches: list[Any],
              loss_fn: LossFn | None) -> dict[str, tuple[torch.Tensor, int]]:
    """RMS of every input feature of each ``nn.Linear``/``Conv1D`` weight in ``tensors`` over the
    calibration tokens: ``{name: (rms [in_features], axis of the input features in W)}``."""
    owner = {id(t): n for n, t in tensors.items()}
    sums: dict[str, list] = {}  # name -> [Σ x² per input feature (float64), rows, input dim]
    hooks = []

    def hook(name: str, dim: int):
        def record(module, inputs, output):
            if not inputs:  # called with keyword arguments only: nothing positional to measure
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            entry = sums.setdefault(name, [0.0, 0, dim])
            entry[0] = entry[0] + x.square().sum(0)
            entry[1] += x.shape[0]
        return record

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(weight) in owner:
            dim = 1 if isinstance(module, torch.nn.Linear) else 0
            hooks.append(module.register_forward_hook(hook(owner[id(weight)], dim)))
    try:
        with _calibrating(model, []), torch.no_grad():
            for batch in batches:
                _run(model, batch, loss_fn)
    finally:
        for h in hooks:
            h.remove()
    return {name: ((total / count).sqrt().float(), dim) for name, (total, count, dim) in sums.items() if count > 0}


def scale_by_input_rms(values: torch.Tensor, rms: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """``values`` (shaped like a weight) times the RMS of the input feature each element multiplies;
    unchanged for a tensor that is no Linear weight (or whose layer never ran)."""
    if rms is None:
        return values
    scale, dim = rms
    scale = scale.to(values.device)
    return values * (scale[None, :] if dim == 1 else scale[:, None])


def gradient_moments(
    model: torch.nn.Module,
    layout: BlockLayout,
    calibration: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    micro_batch: int | None = 1,
    max_examples: int | None = 512,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient ``g`` and empirical Fisher diagonal ``F`` of the loss, per layout tensor.

    ``g`` is the mean of the calibration batches' gradients; ``F`` the mean of squared gradients of
    micro-batches of ``micro_batch`` examples (1: the per-example empirical Fisher), scaled by the
    micro-batch size so that it estimates the per-example second moment whatever the split.
    Batches that are not dicts of equally long tensors are used whole. PUBLIC data only, like every
    data-driven saliency; the model is left as found.
    """
    batches = _public_batches(calibration, "gradient", None)
    tensors = _layout_tensors(model.state_dict(keep_vars=True), layout)
    params = {n: t for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)}
    grad_sum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    sq_sum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    pieces, examples = 0, 0
    with _calibrating(model, list(params.values())), torch.enable_grad():
        for piece in _micro_batches(batches, micro_batch, max_examples):
            size = _batch_len(piece) or 1
            loss = _scalar_loss(model, piece, loss_fn)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    g = p.grad.detach().float()
                    grad_sum[n] += g * size
                    sq_sum[n] += g.square() * size
                p.grad = None  # no gradient of (public) data left on the model
            pieces += 1
            examples += size
    if not pieces:
        raise CalibrationRequiredError("The calibration data yielded no example for the loss estimate.")
    zeros = {n: torch.zeros(t.shape, dtype=torch.float32) for n, t in tensors.items() if n not in params}
    mean = {**{n: s / examples for n, s in grad_sum.items()}, **zeros}
    fisher = {**{n: s / examples * (examples / pieces) for n, s in sq_sum.items()}, **zeros}
    return mean, fisher


def _scalar_loss(model, batch, loss_fn) -> torch.Tensor:
    out = _run(model, batch, loss_fn)
    loss = out if loss_fn is not None else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise SaliencyError(
            "Gradient saliency needs a scalar loss: include labels in the calibration batches "
            "(model(**batch).loss) or pass loss_fn(model, batch) -> scalar tensor."
        )
    return loss


def _batch_len(batch: Any) -> int | None:
    """The common leading size of a dict batch's tensors, or None when it has none."""
    if not isinstance(batch, Mapping):
        return None
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _micro_batches(batches: list[Any], size: int | None, max_examples: int | None):
    """Split dict batches into pieces of ``size`` examples (at most ``max_examples`` in all)."""
    seen = 0
    for batch in batches:
        n = _batch_len(batch)
        if size is None or n is None:
            yield batch
            seen += n or 1
        else:
            for start in range(0, n, size):
                if max_examples is not None and seen >= max_examples:
                    return
                yield {k: v[start : start + size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                       for k, v in batch.items()}
                seen += min(size, n - start)
        if max_examples is not None and seen >= max_examples:
            return


class _Lazy(Mapping):
    """A read-only mapping whose values are computed when looked up."""

    def __init__(self, fn: Callable[[str], torch.Tensor], keys: list[str]) -> None:
        self._fn, self._keys = fn, keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._fn(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
