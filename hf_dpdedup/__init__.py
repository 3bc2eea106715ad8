"""hf_dpdedup: deduplicate families of differentially private fine-tuned models and ship them
through the Hugging Face Hub.

Quick start::

    from hf_dpdedup import DedupConfig, DedupData, DedupedFamily, DedupedModel, Member, PrivacyMetadata

    members = [Member(f"eps{e:g}", model, PrivacyMetadata(e, 1e-5, ("my-data",))) for e, model in runs]
    family = DedupedFamily.deduplicate(members, DedupData(score_fn, public_val=batches), DedupConfig())
    family.save_pretrained("family")
    model = DedupedModel.from_pretrained("family/members/eps4")

Top-level names are imported lazily, so ``import hf_dpdedup.privacy`` does not pay for
transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .errors import HfDpDedupError

__version__ = "0.1.0"

# A library logs through ``logging.getLogger(__name__)`` and leaves handlers to the application (as
# huggingface_hub and transformers do); ``hf-dpdedup -v`` turns the messages on.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    # the common path: members, data, config -> a family
    "DedupedFamily": "family",
    "DedupData": "dedup.planner",
    "Member": "dedup.planner",
    "PrivacyMetadata": "privacy",
    "classification_score": "dedup.tasks",
    "token_accuracy_score": "dedup.tasks",
    "DedupedModel": "modeling",
    "DedupInfo": "modeling",
    "FORMAT": "store",
    "BlockStore": "store",
    "Codec": "store",
    "FamilyStore": "store",
    "push_family_to_hub": "hub",
    "pipeline": "pipelines",
    "ServingPool": "serving",
    "deduplicate_family": "dedup.storing",
    # the typed config of a deduplication (hf_dpdedup.dedup.config)
    "DedupConfig": "dedup.config",
    "PlanConfig": "dedup.config",
    "Public": "dedup.config",
    "SVT": "dedup.config",
    "NaiveLaplace": "dedup.config",
    "Gallop": "dedup.config",
    "Greedy": "dedup.config",
    "Binary": "dedup.config",
    "Halving": "dedup.config",
    "MCTS": "dedup.config",
}

__all__ = ["HfDpDedupError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .dedup.planner import DedupData, Member
    from .dedup.tasks import classification_score, token_accuracy_score
    from .family import DedupedFamily
    from .modeling import DedupedModel, DedupInfo
    from .privacy import PrivacyMetadata
    from .hub import push_family_to_hub
    from .pipelines import pipeline
    from .dedup.config import MCTS, SVT, Binary, DedupConfig, Gallop, Greedy, Halving, NaiveLaplace, PlanConfig, Public
    from .dedup.storing import deduplicate_family
    from .serving import ServingPool
    from .store import FORMAT, BlockStore, Codec, FamilyStore


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_dpdedup' has no attribute {name!r}")
