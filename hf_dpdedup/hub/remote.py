"""The remote code a member repo ships so that plain transformers loads it.

``hf-dpdedup push`` adds ``modeling_hf_dpdedup.py`` (``templates/``) to every member repo and an
``auto_map`` to its ``config.json`` that points the member's ``AutoModelFor<Task>`` class at it::

    "auto_map": {"AutoModelForSequenceClassification": "modeling_hf_dpdedup.DedupedMember"}

so ``AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)`` and
``transformers.pipeline(model=repo, trust_remote_code=True)`` rebuild the member from its block
store repo at the pinned commit, bit-identical to ``DedupedModel.from_pretrained(repo)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.models.auto import modeling_auto

from .cards import TEMPLATES

REMOTE_CODE_FILE = "modeling_hf_dpdedup.py"
REMOTE_CLASS = f"{REMOTE_CODE_FILE[:-3]}.DedupedMember"
REMOTE_CODE = TEMPLATES / REMOTE_CODE_FILE

# the auto classes a member can be loaded through, with the mapping transformers resolves them by
AUTO_CLASSES = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSeq2SeqLM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForImageClassification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForMultipleChoice": modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
}


def auto_classes(config: dict[str, Any]) -> list[str]:
    """The ``AutoModel…`` classes whose transformers mapping builds this config's architecture."""
    model_type = config.get("model_type")
    archs = set(config.get("architectures") or [])
    found = []
    for auto, mapping in AUTO_CLASSES.items():
        names = mapping.get(model_type)
        names = {names} if isinstance(names, str) else set(names or ())
        if names & archs:
            found.append(auto)
    return found


def config_with_auto_map(config_file: Path) -> bytes:
    """``config.json`` with an ``auto_map`` that sends the member's auto classes to the remote code."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {auto: REMOTE_CLASS for auto in auto_classes(config)}
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def remote_code() -> bytes:
    return REMOTE_CODE.read_bytes()
