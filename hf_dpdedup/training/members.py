"""Saving a family member: a full transformers folder plus its privacy and training records."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..privacy.metadata import PrivacyMetadata

PRIVACY_FILE = "privacy.json"
TRAINING_ARGS_FILE = "training_args.json"
FAMILY_FILE = "family.json"


def member_dirname(epsilon: float) -> str:
    """``eps-1``, ``eps-2.5``, ``eps-inf``: one folder per member, sortable by reading."""
    return "eps-inf" if math.isinf(epsilon) else f"eps-{epsilon:g}"


def save_member(
    model: nn.Module,
    out_dir: str | Path,
    *,
    metadata: PrivacyMetadata,
    training_args: dict[str, Any],
    processor: Any = None,
) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer/processor + ``privacy.json`` + ``training_args.json``."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    (tmp / PRIVACY_FILE).write_text(json.dumps(metadata.to_dict(), indent=2) + "\n")
    (tmp / TRAINING_ARGS_FILE).write_text(json.dumps(training_args, indent=2, default=_json_default) + "\n")
    # A crash mid-save leaves a .partial folder, never a member that looks complete.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_privacy(member_dir: str | Path) -> PrivacyMetadata:
    return PrivacyMetadata.from_dict(json.loads((Path(member_dir) / PRIVACY_FILE).read_text()))


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors whose values differ between two state dicts."""
    return [name for name, t in after.items() if name in before and not torch.equal(before[name], t)]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
