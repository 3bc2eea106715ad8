"""Per-example utility scores of the benchmark tasks.

Every score is in [0, 1] per example and a model's utility is their mean, so that changing one
example of a validation set of size n moves the utility by at most 1/n (the sensitivity the SVT
of the dedup engine relies on).
"""

from __future__ import annotations

import torch


def classification_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where ``argmax(logits)`` equals the label, else 0.0; shape ``[batch]``."""
    return (logits.argmax(dim=-1) == labels).float()


def next_token_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-sentence fraction of positions whose next token is predicted right; shape ``[batch]``.

    Position t predicts token t+1; only real (non-padding) next tokens count. A sentence with no
    next token at all scores 0.
    """
    predicted = logits[:, :-1].argmax(dim=-1)
    target = input_ids[:, 1:]
    mask = attention_mask[:, 1:].float()
    hits = ((predicted == target).float() * mask).sum(dim=1)
    return hits / mask.sum(dim=1).clamp(min=1.0)


def mean_score(scores: torch.Tensor) -> float:
    """The utility of a model: the mean of its per-example scores."""
    return float(scores.float().mean()) if scores.numel() else float("nan")
