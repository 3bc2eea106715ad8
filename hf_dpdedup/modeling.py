"""``DedupedModel.from_pretrained``: rebuild a member as an ordinary transformers model.

The member's config names its class (``config.architectures[0]``); the model is built without
weights under Accelerate's ``init_empty_weights`` and the rebuilt tensors are *assigned* (not
copied) into it, then tied weights are tied again. The result is a plain ``PreTrainedModel`` that
works with ``pipeline(...)``, ``generate`` and ``save_pretrained``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from transformers import AutoConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from .errors import ConstitutionError, StoreFormatError
from .store.member import load_member_state_dict, open_member_store, read_constitution
from .store.format import CONSTITUTION_FILE


@dataclass(frozen=True)
class DedupInfo:
    """What a loaded member is, attached to the model as ``model.dedup_info``."""

    name: str
    member_path: str
    store_id: str
    store_path: str
    privacy: dict[str, Any] | None
    dedup: dict[str, Any] | None

    @property
    def epsilon(self) -> float | None:
        return None if self.privacy is None else self.privacy.get("epsilon")

    @property
    def delta(self) -> float | None:
        return None if self.privacy is None else self.privacy.get("delta")


class DedupedModel:
    """Entry point for loading deduplicated members (like ``AutoModel``, it is never instantiated)."""

    def __init__(self) -> None:  # pragma: no cover - guard
        raise TypeError("Use DedupedModel.from_pretrained(path), which returns a transformers model.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        store_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        model_class: type[PreTrainedModel] | None = None,
        verify: bool = True,
    ) -> PreTrainedModel:
        """Load a member folder as a transformers model with bit-identical weights.

        Args:
            pretrained_model_name_or_path: a member folder (``.../members/<name>``).
            store_dir: the block store folder, if not where the member's constitution says.
            torch_dtype: cast the weights to this dtype after rebuilding (default: stored dtype).
            device_map: ``"auto"``, a device string, or an Accelerate device map dict.
            device: move the model to this device (shorthand for a single-device ``device_map``).
            model_class: the class to build; default ``config.architectures[0]``.
            verify: check the sha256 of every file read (on by default; each file version is
                hashed once per process).

        Example:
            >>> model = DedupedModel.from_pretrained("family/members/eps4")
            >>> model.dedup_info.epsilon
            4.0
        """
        member_dir = _resolve_member(pretrained_model_name_or_path)
        constitution = read_constitution(member_dir)
        store = open_member_store(member_dir, constitution, Path(store_dir) if store_dir else None)
        state_dict = load_member_state_dict(member_dir, constitution, store, verify=verify)
        config = AutoConfig.from_pretrained(member_dir)
        klass = model_class or _model_class(config, constitution.architecture)
        model = build_model(klass, config, state_dict, aliases=constitution.aliases)
        model = _place(model, torch_dtype=torch_dtype, device_map=device_map, device=device)
        model.dedup_info = DedupInfo(
            name=constitution.name,
            member_path=str(member_dir),
            store_id=store.store_id,
            store_path=str(store.path),
            privacy=constitution.privacy,
            dedup=constitution.dedup,
        )
        return model


def _resolve_member(path_or_id: str | os.PathLike) -> Path:
    path = Path(path_or_id)
    if (path / CONSTITUTION_FILE).is_file():
        return path
    if path.is_dir():
        raise StoreFormatError(
            f"{path} has no {CONSTITUTION_FILE}: it is not a deduplicated member folder. "
            "Pass a folder under <family>/members/, or load plain models with transformers."
        )
    raise StoreFormatError(
        f"No member folder at {str(path)!r}. Pass the path of a member folder "
        "(e.g. family/members/eps4)."
    )


def _model_class(config: Any, recorded: str | None) -> type[PreTrainedModel]:
    names = list(getattr(config, "architectures", None) or []) or ([recorded] if recorded else [])
    for name in names:
        klass = getattr(transformers, name, None)
        if isinstance(klass, type) and issubclass(klass, PreTrainedModel):
            return klass
    raise ConstitutionError(
        f"config.json names architectures {names!r}, none of which this transformers "
        f"({transformers.__version__}) provides. Upgrade transformers, or pass model_class=."
    )


def build_model(
    klass: type[PreTrainedModel],
    config: Any,
    state_dict: dict[str, torch.Tensor],
    *,
    aliases: dict[str, str] | None = None,
) -> PreTrainedModel:
    """Build ``klass`` with no weights and assign ``state_dict`` into it; re-tie ``aliases``."""
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
    # Weights are assigned right after: skip transformers' weight initialisation (on meta tensors
    # it is pure Python overhead, most of the construction time of a small model).
    with init_empty_weights(), no_init_weights():
        model = klass._from_config(config, dtype=dtype)
    aliases = aliases or {}
    own = {k: v for k, v in state_dict.items() if k not in aliases}
    result = model.load_state_dict(own, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConstitutionError(
            f"The member holds tensors {result.unexpected_keys[:5]} that {klass.__name__} does not "
            "have: config.json and the stored weights disagree."
        )
    for alias, canonical in aliases.items():
        _tie(model, alias, canonical)
    if any(t.is_meta for t in _tensors(model)):
        model.tie_weights()  # ties the checkpoint itself omitted (e.g. a saved lm_head)
    still_empty = [n for n, t in _named_tensors(model) if t.is_meta]
    if still_empty:
        raise ConstitutionError(
            f"The member lacks weights for {still_empty[:5]} of {klass.__name__}; it was saved from "
            "another architecture or is incomplete: re-save it from the original model."
        )
    model.eval()
    return model


def _named_tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _tensors(model: torch.nn.Module):
    return (t for _, t in _named_tensors(model))


def _tie(model: torch.nn.Module, alias: str, canonical: str) -> None:
    module_name, _, leaf = alias.rpartition(".")
    module = model.get_submodule(module_name)
    source_module_name, _, source_leaf = canonical.rpartition(".")
    source = model.get_submodule(source_module_name)
    if source_leaf in source._parameters:
        setattr(module, leaf, source._parameters[source_leaf])
    else:
        module.register_buffer(leaf, getattr(source, source_leaf))


def _place(
    model: PreTrainedModel,
    *,
    torch_dtype: torch.dtype | str | None,
    device_map: str | dict[str, Any] | None,
    device: str | torch.device | None,
) -> PreTrainedModel:
    if torch_dtype is not None and torch_dtype != "auto":
        dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        model = model.to(dtype)
    if device is not None and device_map is not None:
        raise ValueError("Pass either device= or device_map=, not both.")
    if isinstance(device_map, dict) or device_map == "auto":
        if device_map == "auto":
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules or [])
        if set(device_map.values()) <= {"cpu"}:
            return model
        return dispatch_model(model, device_map=device_map)
    target = device if device is not None else device_map
    return model.to(target) if target is not None else model
