"""Test-only reader of a model card's ``hf_dpdedup`` metadata block."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard

from hf_dpdedup.hub.cards import CARD_KEY


def card_metadata(card: ModelCard) -> dict[str, Any]:
    """The ``hf_dpdedup`` block of a card (e.g. ``ModelCard.load(repo_id)``)."""
    return dict(card.data.to_dict().get(CARD_KEY) or {})
