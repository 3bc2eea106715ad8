"""DP-LoRA: wrap a base with a peft LoRA adapter and DP-train only the adapter (and the head).

A family member trained this way differs from its base only by the adapter's low-rank matrices
(``lora_A``/``lora_B`` of the targeted linear layers) and, for sequence classification, the
classifier head (peft's ``modules_to_save``). Opacus sees only those trainable modules: every one
is an ``nn.Linear``, so per-sample gradients (``hooks``) and ghost clipping both apply; the frozen
base layers (``nn.Linear`` or GPT-2's ``Conv1D``) get no per-sample gradients at all.

Public API:

* :class:`LoraSpec` / :func:`parse_lora_spec` — the adapter's shape, parsed from
  ``r=8,alpha=16,target_modules=query+value,dropout=0.0`` (the ``--lora`` flag).
* :func:`wrap_lora` — ``get_peft_model`` with a seeded adapter init, ``fan_in_fan_out`` set for
  ``Conv1D`` targets and ``base_model_name_or_path`` set to the base as the user gave it.
* :class:`LoraMemberSaver` — the ``saver`` of :func:`~.family.train_members`: a member as a peft
  adapter folder (``saved_as="adapter"``) and/or as the merged transformers model
  (``saved_as="merged"``, ``merge_and_unload`` on a copy), each with ``privacy.json`` and
  ``training_args.json`` (see ``docs/architecture.md``, "DP-LoRA decisions").
* :func:`forward_peft_classifier` — ``(logits, labels)`` of a peft sequence classifier.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import TrainingConfigError
from ..privacy.metadata import PrivacyMetadata
from .data import seed_everything
from .heads import batch_inputs
from .members import save_member

SAVE_MODES = ("adapter", "merged")
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM")
LORA_KEYS = ("r", "alpha", "target_modules", "dropout")
LORA_SYNTAX = "r=<int ≥ 1>,alpha=<number > 0>[,target_modules=<name>+<name>...][,dropout=<number in [0, 1)>]"


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape. ``target_modules=None``: peft's default for the model type."""

    r: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise TrainingConfigError(f"LoRA r must be an integer ≥ 1, got {self.r!r}; e.g. r=8.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise TrainingConfigError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}; e.g. alpha=16.")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise TrainingConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}; e.g. dropout=0.0.")
        if self.target_modules is not None and (
            not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise TrainingConfigError(
                f"LoRA target_modules must be non-empty module names, got {self.target_modules!r}; "
                "e.g. target_modules=query+value."
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``"lora"`` record of ``training_args.json`` (peft's field names)."""
        return {"r": self.r, "lora_alpha": self.alpha,
                "target_modules": None if self.target_modules is None else list(self.target_modules),
                "lora_dropout": self.dropout}


def parse_lora_spec(text: str) -> LoraSpec:
    """Parse ``r=8,alpha=16,target_modules=query+value,dropout=0.0`` (``+`` separates modules).

    Keys: ``r`` and ``alpha`` (required), ``target_modules`` (default: peft's choice for the model
    type, e.g. ``query+value`` for BERT, ``c_attn`` for GPT-2), ``dropout`` (default 0.0). Anything
    else raises :class:`TrainingConfigError` naming what is accepted.
    """
    fields: dict[str, str] = {}
    for item in (part.strip() for part in str(text).split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise TrainingConfigError(f"Cannot read {item!r} in --lora {text!r}; write key=value pairs: {LORA_SYNTAX}.")
        if key not in LORA_KEYS:
            raise TrainingConfigError(f"Unknown LoRA key {key!r} in {text!r}; accepted keys: {', '.join(LORA_KEYS)} "
                                      f"({LORA_SYNTAX}).")
        if key in fields:
            raise TrainingConfigError(f"LoRA key {key!r} is given twice in {text!r}.")
        fields[key] = value
    missing = [k for k in ("r", "alpha") if k not in fields]
    if missing:
        raise TrainingConfigError(f"--lora {text!r} lacks {', '.join(missing)}; write {LORA_SYNTAX}.")
    modules = None
    if "target_modules" in fields:
        modules = tuple(m.strip() for m in fields["target_modules"].split("+"))
        if not all(modules):
            raise TrainingConfigError(f"Empty module name in target_modules={fields['target_modules']!r}; "
                                      "separate names with '+', e.g. target_modules=query+value.")
    return LoraSpec(r=_number(fields["r"], "r", int), alpha=_integral(_number(fields["alpha"], "alpha", float)),
                    target_modules=modules, dropout=_number(fields.get("dropout", "0"), "dropout", float))


def _number(value: str, key: str, kind: type) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise TrainingConfigError(
            f"LoRA {key}={value!r} is not {'an integer' if kind is int else 'a number'}; write {LORA_SYNTAX}."
        ) from None
    return number


def _integral(x: float) -> float | int:
    """``16.0`` → ``16``, as peft's ``lora_alpha`` is usually written; ``0.5`` stays."""
    return int(x) if math.isfinite(x) and x == int(x) else x


def check_save_modes(modes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a non-empty, duplicate-free choice among :data:`SAVE_MODES`."""
    modes = tuple(modes)
    if not modes or len(set(modes)) != len(modes) or any(m not in SAVE_MODES for m in modes):
        raise TrainingConfigError(f"Save a LoRA member as one of {SAVE_MODES} (or both, once each), got {modes!r}.")
    return modes


def wrap_lora(model: nn.Module, spec: LoraSpec, *, task_type: str, seed: int, base_name: str | Path) -> PeftModel:
    """``get_peft_model`` with the adapter init seeded from ``seed``; only adapter (+ head) params train.

    ``task_type`` is ``"SEQ_CLS"`` (the classifier is trained and saved via ``modules_to_save``)
    or ``"CAUSAL_LM"``. ``base_name`` is recorded as the adapter's ``base_model_name_or_path``.
    """
    if task_type not in TASK_TYPES:
        raise TrainingConfigError(f"LoRA task_type must be one of {TASK_TYPES}, got {task_type!r}.")
    targets = list(spec.target_modules) if spec.target_modules is not None else None
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
        task_type=task_type, fan_in_fan_out=_targets_conv1d(model, targets), bias="none",
    )
    seed_everything(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft: target modules not found / not supported, unknown model type
        raise TrainingConfigError(
            f"Cannot put a LoRA adapter on this {type(model).__name__}: {exc} "
            "Name linear layers of the model in target_modules (e.g. query+value for BERT, c_attn for GPT-2)."
        ) from exc
    peft_model.peft_config["default"].base_model_name_or_path = str(base_name)
    return peft_model


def _targets_conv1d(model: nn.Module, targets: list[str] | None) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``[in, out]``: peft needs ``fan_in_fan_out=True``."""
    if targets is None:
        return getattr(getattr(model, "config", None), "model_type", None) == "gpt2"
    hits = [m for name, m in model.named_modules() if name.split(".")[-1] in targets]
    return bool(hits) and all(isinstance(m, Conv1D) for m in hits)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters DP-SGD trains (adapter matrices, and the head for SEQ_CLS)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def forward_peft_classifier(module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a peft sequence classifier on ``(input_ids, attention_mask, labels)``.

    Per-batch position/token-type ids as in :func:`.heads.batch_inputs`, filtered by what the
    wrapped transformers model's ``forward`` accepts (peft's own ``forward`` takes ``**kwargs``).
    """
    input_ids, attention_mask, labels = batch
    peft_model = getattr(module, "_module", module)  # Opacus' GradSampleModule wraps the model
    accepted = inspect.signature(peft_model.get_base_model().forward).parameters
    inputs = {k: v for k, v in batch_inputs(input_ids, attention_mask).items() if k in accepted}
    return module(**inputs).logits, labels


class LoraMemberSaver:
    """Save a DP-LoRA member as an adapter folder and/or a merged model, one folder per mode.

    ``out_dirs`` maps each save mode to the folder its members go to (``<dir>/eps-<ε>``).
    Called by :func:`~.family.train_members` as ``saver(model, name, metadata, training_args)``;
    returns the first mode's member folder.
    """

    def __init__(self, out_dirs: dict[str, str | Path], *, processor: Any = None) -> None:
        check_save_modes(tuple(out_dirs))
        self.out_dirs = {mode: Path(d) for mode, d in out_dirs.items()}
        self.processor = processor

    def __call__(self, model: nn.Module, name: str, metadata: PrivacyMetadata, training_args: dict) -> Path:
        if not isinstance(model, PeftModel):
            raise TrainingConfigError(f"A LoRA member must be a peft model, got {type(model).__name__}.")
        paths = [save_lora_member(model, out / name, saved_as=mode, metadata=metadata,
                                  training_args=training_args, processor=self.processor)
                 for mode, out in self.out_dirs.items()]
        return paths[0]


def save_lora_member(
    model: PeftModel,
    out_dir: str | Path,
    *,
    saved_as: str,
    metadata: PrivacyMetadata,
    training_args: dict[str, Any],
    processor: Any = None,
) -> Path:
    """One member folder: the peft adapter (``"adapter"``) or the merged transformers model (``"merged"``).

    Merging works on a deep copy, so ``model`` keeps its adapter (and can be saved both ways).
    """
    check_save_modes((saved_as,))
    args = {**training_args, "saved_as": saved_as}
    if saved_as == "adapter":
        return save_member(model, out_dir, metadata=metadata, training_args=args, processor=processor)
    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.grad = None
    return save_member(merged, out_dir, metadata=metadata, training_args=args, processor=processor)
