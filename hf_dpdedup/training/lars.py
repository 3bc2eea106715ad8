"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, 2017).

Large-batch SGD with one learning rate per tensor, scaled by the trust ratio
``η · ‖w‖ / ‖g + λw‖``. DP-SGD trains with large logical batches, where LARS is reported to
beat plain SGD. It wraps cleanly under Opacus' ``DPOptimizer``, which only sets ``p.grad`` to the
noisy clipped gradient before calling ``step``.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise trust ratios.

    Args:
        params: parameters or parameter groups.
        lr: global learning rate (multiplies the trust ratio).
        momentum: heavy-ball momentum.
        weight_decay: L2 penalty λ, added to the gradient before the update.
        trust_coefficient: η; the per-tensor rate is ``lr · η · ‖w‖ / ‖g + λw‖``.
        eps: guards the division.
        exclude_1d: tensors with one dimension (biases, norms) get neither weight decay nor the
            trust ratio, as in the paper's usual practice.

    Example:
        >>> opt = LARS(model.parameters(), lr=1.0, momentum=0.9)
    """

    def __init__(
        self,
        params,
        lr: float,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        exclude_1d: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("weight_decay must be ≥ 0 and trust_coefficient > 0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, eps=eps, exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = self._scaled_update(p, p.grad, group)
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(update)
                    update = buf
                p.add_(update, alpha=-group["lr"])
        return loss

    @staticmethod
    def _scaled_update(p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        if group["exclude_1d"] and p.ndim <= 1:
            return grad.clone()
        grad = grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad.clone()
        w_norm = torch.linalg.vector_norm(p)
        g_norm = torch.linalg.vector_norm(grad)
        # A zero weight or gradient norm gives no scale information: fall back to ratio 1.
        trust = torch.where(
            (w_norm > 0) & (g_norm > 0),
            group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
            torch.ones_like(w_norm),
        )
        return grad.mul_(trust)
