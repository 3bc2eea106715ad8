"""Cheap DP training of a BERT classifier's top: the last layer evaluated at [CLS] only.

``BertForSequenceClassification`` classifies from the pooler, which reads only the [CLS] position
of the last encoder layer. In that layer everything after self-attention (attention output
projection, both LayerNorms, the feed-forward block) is per position, so for the logits it is
enough to evaluate it at [CLS]. With the embeddings, the bottom layers and the top layer's
query/key/value projections frozen, the two inputs of that computation — the [CLS] hidden state
entering the top layer (the residual) and the [CLS] attention context — are fixed per sentence and
can be cached once for the whole family. DP-SGD then trains ~1.5 M parameters of MiniLM-L6 (the
top layer's attention-output and feed-forward weights, pooler, classifier) at MLP speed, and the
trained tensors are the model's own, so the member saves as an ordinary transformers folder.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import TrainingConfigError

# Relative to the model: what the head trains (everything else stays as in the base).
TRAINED_MODULES = (
    "{base}.encoder.layer.{top}.attention.output.dense",
    "{base}.encoder.layer.{top}.attention.output.LayerNorm",
    "{base}.encoder.layer.{top}.intermediate.dense",
    "{base}.encoder.layer.{top}.output.dense",
    "{base}.encoder.layer.{top}.output.LayerNorm",
    "{base}.pooler.dense",
    "classifier",
)


def _top_layer(model: nn.Module) -> nn.Module:
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if base is None or layers is None or getattr(base, "pooler", None) is None:
        raise TrainingConfigError(
            f"{type(model).__name__} is not a BERT-style classifier (encoder.layer, pooler, classifier); "
            "use strategy='direct' for it."
        )
    layer = layers[-1]
    needed = (layer.attention.output.dense, layer.intermediate.dense, layer.output.dense, model.classifier)
    if not all(isinstance(m, nn.Linear) for m in needed):
        raise TrainingConfigError(f"{type(model).__name__}'s top layer is not BERT-shaped; use strategy='direct'.")
    return layer


def trained_module_names(model: nn.Module) -> list[str]:
    """Fully-qualified names of the modules the top-[CLS] strategy trains."""
    _top_layer(model)
    top = len(getattr(model, model.base_model_prefix).encoder.layer) - 1
    return [name.format(base=model.base_model_prefix, top=top) for name in TRAINED_MODULES]


def freeze_all_but_top(model: nn.Module) -> list[str]:
    """Set ``requires_grad`` on the trained modules only; return the trained parameter names."""
    prefixes = tuple(n + "." for n in trained_module_names(model))
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            names.append(name)
    return names


class BertTopClsHead(nn.Module):
    """Logits from cached (residual, context) of [CLS]; shares its parameters with ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        layer = _top_layer(model)
        base = getattr(model, model.base_model_prefix)
        self.attn_out = layer.attention.output  # dense, LayerNorm, dropout
        self.intermediate = layer.intermediate  # dense + activation
        self.output = layer.output  # dense, LayerNorm, dropout
        self.pooler = base.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, residual: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attended = self.attn_out(context, residual)  # LayerNorm(dropout(W_o·ctx) + residual)
        hidden = self.output(self.intermediate(attended), attended)
        pooled = self.pooler.activation(self.pooler.dense(hidden))
        return self.classifier(self.dropout(pooled))


def batch_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs with per-batch, contiguous position and token-type ids.

    Opacus computes per-sample gradients from per-sample inputs: the ``[1, L]`` position-ids buffer
    BERT uses by default breaks that ("stack expects each tensor to be equal size"), and an
    ``expand``-ed view breaks the ghost-clipping embedding norm, so materialise ``[B, L]``.
    """
    b, length = input_ids.shape
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(length).repeat(b, 1),
        "token_type_ids": torch.zeros_like(input_ids),
    }


@torch.no_grad()
def cache_top_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen part once; return ``(residual, context)`` of [CLS], each ``[N, hidden]``.

    fp16 halves the cache of a 67 k-sentence training set; evaluation caches use fp32 so the head
    computes exactly what the full forward computes at [CLS].
    """
    layer = _top_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def grab_residual(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["residual"] = hidden[:, 0]

    def grab_context(_module, args):
        captured["context"] = args[0][:, 0]

    hooks = [
        layer.register_forward_pre_hook(grab_residual, with_kwargs=True),
        layer.attention.output.dense.register_forward_pre_hook(grab_context),
    ]
    was_training = model.training
    model.eval()
    # Length-sorted batches trimmed to their longest sentence: padding is most of SST-2's tokens.
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    residual = torch.empty(len(input_ids), layer.attention.output.dense.out_features, dtype=dtype)
    context = torch.empty_like(residual)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(int(lengths[idx].max()), 1)
            ids, mask = input_ids[idx, :width], attention_mask[idx, :width]
            getattr(model, model.base_model_prefix)(**batch_inputs(ids, mask))
            residual[idx] = captured["residual"].to(dtype)
            context[idx] = captured["context"].to(dtype)
            if progress:
                progress(len(idx))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return residual, context
