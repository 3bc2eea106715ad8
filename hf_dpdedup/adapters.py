"""peft adapters as family members: load an adapter folder, rebuild a stored adapter member.

An *adapter folder* is what ``PeftModel.save_pretrained`` writes (``adapter_config.json`` naming its
base by folder or Hub id in ``base_model_name_or_path``, ``adapter_model.safetensors``), plus the
member's ``privacy.json``. :func:`load_adapter_folder` loads it as a ``PeftModel`` the way peft's
``AutoPeftModelFor*`` classes do: the base through the transformers auto class of the adapter's
``task_type``, then the adapter on top. How such a model is stored is :mod:`.store.adapter`;
:func:`empty_peft_model` rebuilds the module tree of a stored one without weights, for
:mod:`.modeling` to assign the stored tensors into. (Recognising a ``PeftModel`` and refusing it where
only full models go needs no peft import: :mod:`.store.adapter`.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate import init_empty_weights

from .errors import AdapterError
from .store.constitution import AdapterRecord
from .store.format import ADAPTER_CONFIG_FILE

#: the transformers auto class that builds the base of each peft task type (as peft's AutoPeftModelFor*)
BASE_AUTO_CLASSES: dict[str | None, Any] = {
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
    "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": transformers.AutoModel,
}


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """A peft adapter folder (it has ``adapter_config.json``)."""
    return (Path(folder) / ADAPTER_CONFIG_FILE).is_file()


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} cannot be read ({type(exc).__name__}: {exc}); save the adapter again with "
                           "PeftModel.save_pretrained.") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise AdapterError(f"{path} names no peft_type: it is not a peft adapter config. Save the adapter again "
                           "with PeftModel.save_pretrained.")
    return config


def resolve_base(folder: Path, base: Any) -> str:
    """The base model of an adapter folder: its ``base_model_name_or_path`` as a folder (absolute, or
    relative to the working directory or to the adapter folder) or else as a Hub id."""
    if not isinstance(base, str) or not base:
        raise AdapterError(
            f"{folder / ADAPTER_CONFIG_FILE} names no base model (base_model_name_or_path): set it to the base "
            "model's folder or Hub id."
        )
    for candidate in (Path(base), folder / base):
        if (candidate / "config.json").is_file():
            return str(candidate)
    if Path(base).is_absolute() or base.startswith(("./", "../")) or base.count("/") > 1:
        raise AdapterError(
            f"The base model {base!r} of adapter {folder} is not a model folder (no config.json there). Put the "
            f"base back there, or edit base_model_name_or_path in {folder / ADAPTER_CONFIG_FILE}."
        )
    return base  # a Hub id: transformers resolves (and caches) it


def model_config(folder: str | os.PathLike) -> transformers.PretrainedConfig:
    """The transformers config of the model a member folder loads as: its own ``config.json``, or
    for an adapter folder its base's."""
    folder = Path(folder)
    if is_adapter_folder(folder):
        return transformers.AutoConfig.from_pretrained(
            resolve_base(folder, read_adapter_config(folder).get("base_model_name_or_path")))
    return transformers.AutoConfig.from_pretrained(folder)


def base_auto_class(task_type: str | None, where: str) -> Any:
    if task_type not in BASE_AUTO_CLASSES:
        raise AdapterError(
            f"{where}: peft task_type {task_type!r} is not supported; adapter members need one of "
            f"{sorted(t for t in BASE_AUTO_CLASSES if t)} (set task_type when creating the LoraConfig)."
        )
    return BASE_AUTO_CLASSES[task_type]


def load_adapter_folder(folder: str | os.PathLike, *, device_map: Any = None,
                        max_memory: dict[Any, int] | None = None) -> peft.PeftModel:
    """An adapter folder as an (eval-mode, frozen) ``PeftModel`` on its base, as
    ``peft.AutoPeftModelFor<Task>.from_pretrained(folder)`` loads it."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    auto = base_auto_class(config.get("task_type"), str(folder))
    base_path = resolve_base(folder, config.get("base_model_name_or_path"))
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
    try:
        base = auto.from_pretrained(base_path, revision=config.get("revision"), **placement)
    except OSError as exc:
        raise AdapterError(
            f"The base model {base_path!r} of adapter {folder} cannot be loaded ({str(exc).splitlines()[0]}). "
            f"Make it available (download it, or fix base_model_name_or_path in {folder / ADAPTER_CONFIG_FILE})."
        ) from None
    model = peft.PeftModel.from_pretrained(base, folder)
    return model.eval()


def peft_class(record: AdapterRecord) -> type[peft.PeftModel]:
    klass = getattr(peft, record.peft_class, None)
    if isinstance(klass, type) and issubclass(klass, peft.PeftModel):
        return klass
    if record.task_type in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
        return peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[record.task_type]
    raise AdapterError(
        f"The member is a {record.peft_class} adapter, which this peft ({peft.__version__}) does not provide. "
        "Upgrade peft (pip install -U peft)."
    )


def peft_config(record: AdapterRecord) -> peft.PeftConfig:
    try:
        return peft.PeftConfig.from_peft_type(**record.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(
            f"The member's {record.peft_type} adapter config cannot be used by this peft ({peft.__version__}): "
            f"{type(exc).__name__}: {exc}. Upgrade peft (pip install -U peft)."
        ) from None


def empty_peft_model(record: AdapterRecord, base: torch.nn.Module) -> tuple[peft.PeftModel, tuple[str, ...]]:
    """``base`` (built without weights) wrapped in the member's adapter, every adapter tensor on the
    meta device: the stored tensors are assigned into it. In inference mode, as peft loads adapters.
    Also returns the names of the tensors the adapter added (see :func:`match_adapter_dtypes`)."""
    config = peft_config(record)
    config.inference_mode = True
    own = {id(t) for t in base.parameters()}
    with init_empty_weights():
        model = peft_class(record)(base, config, record.adapter_name, autocast_adapter_dtype=False,
                                   low_cpu_mem_usage=True)
    added = tuple(n for n, p in model.named_parameters() if id(p) not in own)
    return model, added


def match_adapter_dtypes(model: torch.nn.Module, added: tuple[str, ...], state_dict: dict[str, torch.Tensor]) -> None:
    """Give the (empty) tensors the adapter added the dtype they were stored with: peft creates them in
    the default dtype, while an adapter may have been trained in the base's dtype (bf16, ...) or
    upcast to float32 beside a half-precision base (peft's ``autocast_adapter_dtype``)."""
    for name in added:
        stored = state_dict.get(name)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters.get(leaf)
        if stored is None or param is None or not param.is_meta or param.dtype == stored.dtype:
            continue
        if param.is_floating_point() and stored.is_floating_point():
            module._parameters[leaf] = torch.nn.Parameter(param.to(stored.dtype), requires_grad=param.requires_grad)
