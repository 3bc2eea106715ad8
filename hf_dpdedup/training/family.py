"""The family loop: one base, one private data set, one DP member per ε.

Every member starts from the same weights and the same seeds (init, Poisson sampling, noise), so
members differ only by their privacy budget — as in the paper. Task modules (:mod:`.text`, the
benchmark scripts) build the model, the trained module and the evaluation, then call
:func:`train_members`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from ..errors import TrainingConfigError
from ..privacy.metadata import PrivacyMetadata
from .data import TextClassificationData
from .members import FAMILY_FILE, changed_tensors, member_dirname, save_member
from .opacus_train import DPConfig, DPResult, ForwardFn, train_dp, validate_budget

MemberSaver = Callable[[nn.Module, str, PrivacyMetadata, dict], Path]


@dataclass(frozen=True)
class MemberSummary:
    """One row of the family table."""

    epsilon: float
    delta: float
    steps: int
    noise_multiplier: float
    public_val_accuracy: float
    public_test_accuracy: float
    seconds: float
    path: str


def check_family_request(epsilons: list[float], delta: float, *data: TextClassificationData) -> None:
    """Every check that does not need the model: run before anything is loaded or trained."""
    if not epsilons:
        raise TrainingConfigError("Give at least one ε for the family.")
    for eps in epsilons:
        validate_budget(eps, delta)
    if len(set(epsilons)) != len(epsilons):
        raise TrainingConfigError(f"ε values must be distinct, got {epsilons}.")
    for part in data:
        if len(part) == 0:
            raise TrainingConfigError("A data set is empty; DP training and evaluation need examples.")
    if data and len(set(data[0].labels)) < 2:
        raise TrainingConfigError("The training data has fewer than two distinct labels; nothing to classify.")


def train_members(
    *,
    model: nn.Module,
    module: nn.Module,
    train_set: Dataset,
    forward: ForwardFn,
    criterion: nn.Module,
    evaluate: Callable[[nn.Module], tuple[float, float]],
    epsilons: list[float],
    config: DPConfig,
    out: str | Path,
    dataset_id: str,
    trained_names: list[str],
    processor: Any = None,
    extra_args: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    saver: MemberSaver | None = None,
) -> list[MemberSummary]:
    """The family loop shared by every task: reset, DP-train, evaluate, save — once per ε.

    ``module`` is what DP-SGD trains (``model`` itself, or a head sharing its parameters);
    ``model`` is what is saved. Every member starts from ``model``'s weights at call time and from
    ``config.seed``. ``evaluate(module)`` returns (public validation, public test) utility.
    ``saver(model, member_name, metadata, training_args)`` writes a member and returns its folder
    (default: :func:`~.members.save_member` to ``out/<member_name>`` with ``processor``; DP-LoRA
    families pass a :class:`~.lora.LoraMemberSaver`).
    """
    check_family_request(epsilons, config.delta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    summaries = []
    for eps in epsilons:
        model.load_state_dict(initial)
        member_config = replace(config, epsilon=float(eps))
        report = (lambda s, t, _l, e=eps: progress(f"ε={e:g}", s, t)) if progress else None
        result = train_dp(module, train_set, forward=forward, criterion=criterion, config=member_config,
                          dataset_ids=(dataset_id,), progress=report)
        val_acc, test_acc = evaluate(module)
        args = {
            **(extra_args or {}), "dataset_id": dataset_id, "dp": member_config.to_dict(),
            "seeded_noise": not member_config.secure_mode, "trained_parameters": trained_names,
            "changed_tensors": changed_tensors(initial, model.state_dict()),
            "noise_multiplier": result.noise_multiplier, "sample_rate": result.sample_rate,
            "steps": result.steps, "seconds": round(result.seconds, 1),
            "public_val_accuracy": val_acc, "public_test_accuracy": test_acc,
        }
        if saver is None:
            path = save_member(model, out / member_dirname(eps), metadata=result.metadata,
                               training_args=args, processor=processor)
        else:
            path = saver(model, member_dirname(eps), result.metadata, args)
        summaries.append(_summary(result, member_config, val_acc, test_acc, path))
    _write_family(out, summaries, dataset_id=dataset_id, **{k: v for k, v in (extra_args or {}).items()
                                                           if isinstance(v, (str, int, float))})
    return summaries


def _summary(result: DPResult, config: DPConfig, val_acc: float, test_acc: float, path: Path) -> MemberSummary:
    return MemberSummary(
        epsilon=config.epsilon, delta=config.delta, steps=result.steps,
        noise_multiplier=result.noise_multiplier, public_val_accuracy=val_acc,
        public_test_accuracy=test_acc, seconds=result.seconds, path=str(path),
    )


def _write_family(out: Path, summaries: list[MemberSummary], **info) -> None:
    rows = [{**s.__dict__, "epsilon": "inf" if math.isinf(s.epsilon) else s.epsilon} for s in summaries]
    (out / FAMILY_FILE).write_text(json.dumps({**info, "members": rows}, indent=2) + "\n")
