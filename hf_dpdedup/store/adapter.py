"""How a peft adapter model is recorded as a member (no peft import: storing needs none).

A ``PeftModel`` (one active adapter) is stored whole: its state dict holds the base's weights
(``...base_layer.weight``, shared with every other adapter on that base through content-addressed
rows) and the adapter's own tensors (``lora_A`` / ``lora_B``, ``modules_to_save`` copies). What
peft needs to rebuild it goes into the constitution's :class:`~.constitution.AdapterRecord` and,
for peft's and the Hub's tools, into the member folder's ``adapter_config.json`` beside the base's
``config.json``.
"""

from __future__ import annotations

import copy
import enum
import json
from typing import Any

from ..errors import AdapterNotSupportedError
from .constitution import AdapterRecord


def is_peft_model(model: Any) -> bool:
    """True for a peft ``PeftModel`` (duck-typed: a ``peft_config`` dict and a ``get_base_model``)."""
    return isinstance(getattr(model, "peft_config", None), dict) and callable(getattr(model, "get_base_model", None))


def adapter_record(model: Any) -> AdapterRecord:
    """The record of a ``PeftModel``'s active adapter; several adapters at once are refused."""
    configs = model.peft_config
    if len(configs) != 1:
        raise AdapterNotSupportedError(
            f"{type(model).__name__} holds {len(configs)} adapters ({sorted(configs)}); a member is one adapter "
            "on its base. Store each adapter as its own member (model.delete_adapter(...) or load one at a time)."
        )
    name, peft_config = next(iter(configs.items()))
    config = adapter_config_dict(peft_config)
    base = model.get_base_model()
    return AdapterRecord(
        peft_type=str(config["peft_type"]),
        task_type=config.get("task_type"),
        peft_class=type(model).__name__,
        base_model_class=type(base).__name__,
        config=config,
        base_model=config.get("base_model_name_or_path"),
        adapter_name=name,
    )


def adapter_config_dict(peft_config: Any) -> dict[str, Any]:
    """A peft config as ``PeftModel.save_pretrained`` writes ``adapter_config.json`` (sets as lists,
    sorted here so the bytes are deterministic; ``inference_mode`` true)."""
    raw = peft_config.to_dict()
    raw = {k: sorted(v) if isinstance(v, set) else v for k, v in raw.items()}
    raw["inference_mode"] = True
    return json.loads(json.dumps(raw, default=_json_value))


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"adapter config value {value!r} is not JSON serialisable")


def base_config(model: Any) -> Any:
    """The base model's transformers config, naming the base class (as ``save_pretrained`` does)."""
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    return config


def adapter_config_bytes(record: AdapterRecord) -> bytes:
    """``adapter_config.json`` of an adapter member (peft's layout: sorted keys, indent 2)."""
    return json.dumps(record.config, indent=2, sort_keys=True).encode()


def refuse_peft_model(model: Any, where: str, instead: str) -> None:
    """A typed error when a ``PeftModel`` reaches ``where``, which takes full models only."""
    if is_peft_model(model):
        raise AdapterNotSupportedError(
            f"{where} takes full transformers models, not a peft {type(model).__name__}. {instead}"
        )
