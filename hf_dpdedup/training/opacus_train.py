"""One DP-SGD training run with Opacus: the building block of every family member.

``train_dp`` takes any ``nn.Module`` whose trainable parameters are the ones to privatise, a
``Dataset`` of tensor tuples, a function mapping ``(module, batch)`` to ``(outputs, targets)`` and a
criterion. It calibrates the noise for the requested (ε, δ) like ``make_private_with_epsilon``
(see :func:`calibrate_noise`),
handles logical vs. physical batch sizes with ``BatchMemoryManager`` and returns what the
accountant recorded. ``epsilon=math.inf`` runs the same loop without Opacus (a non-private
reference, useful to check that a setup learns at all before adding noise).
"""

from __future__ import annotations

import functools
import math
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import PrivacyBudgetError, TrainingConfigError
from ..privacy import check_delta, check_epsilon
from ..privacy.metadata import PrivacyMetadata
from . import opacus_layers  # noqa: F401  (registers GPT-2 Conv1D samplers)
from .lars import LARS

OPTIMIZERS = ("sgd", "adam", "lars")
GRAD_SAMPLE_MODES = ("ghost", "hooks")

ForwardFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DPConfig:
    """Hyper-parameters of one DP-SGD run. ``batch_size`` is the *logical* (expected) batch size.

    ``secure_mode`` (default True): the Poisson sampling and the Gaussian noise come from generators
    seeded with 64 bits of ``os.urandom`` each, and the noise is drawn the floating-point-robust way
    of Opacus' own secure mode (the sum of four draws, halved). Opacus' ``secure_mode=True`` needs
    ``torchcsprng``, which has no build for current torch; the noise itself is never released, so a
    secret 64-bit seed keeps it as unpredictable to a reader of the weights. ``secure_mode=False``
    seeds sampling and noise from ``seed``: a run is then reproducible bit for bit, which is what
    tests and reproductions want and exactly what breaks DP (retraining under each neighbouring data
    set identifies the one used). The metadata of such a run says ``seeded=True`` and every report
    and card derived from it says "not a privacy guarantee". ``seed`` always seeds the public
    randomness (initialisation, shuffling).
    """

    epsilon: float
    delta: float
    epochs: int = 3
    batch_size: int = 1024
    physical_batch_size: int | None = None
    lr: float = 1.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "ghost"
    accountant: str = "rdp"
    seed: int = 0
    secure_mode: bool = True

    def __post_init__(self) -> None:
        validate_budget(self.epsilon, self.delta)
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingConfigError(f"epochs and batch_size must be ≥ 1, got {self.epochs}, {self.batch_size}.")
        if self.physical_batch_size is not None and self.physical_batch_size < 1:
            raise TrainingConfigError(f"physical_batch_size must be ≥ 1, got {self.physical_batch_size}.")
        if not (self.lr > 0 and self.max_grad_norm > 0):
            raise TrainingConfigError(f"lr and max_grad_norm must be > 0, got {self.lr}, {self.max_grad_norm}.")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise TrainingConfigError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["epsilon"] = "inf" if math.isinf(self.epsilon) else self.epsilon
        return d


def validate_budget(epsilon: float, delta: float) -> None:
    """Raise :class:`TrainingConfigError` unless ``ε > 0`` (``inf`` = non-private) and ``0 < δ < 1``
    (the privacy package's checks, :func:`~hf_dpdedup.privacy.check_epsilon` and
    :func:`~hf_dpdedup.privacy.check_delta`, as a training configuration error)."""
    try:
        check_epsilon(epsilon, allow_inf=True)
        check_delta(delta, allow_zero=False)
    except PrivacyBudgetError as exc:
        raise TrainingConfigError(
            f"{exc} Pick budgets such as ε = 1, 2, 4 or 8 and a δ below 1/n (n training examples), such as 1e-5."
        ) from None


@dataclass
class DPResult:
    """What one run did: the accountant's ε for its history, the noise, and the losses seen."""

    epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    seconds: float
    metadata: PrivacyMetadata
    losses: list[float] = field(default_factory=list)


def make_optimizer(params: list[nn.Parameter], config: DPConfig) -> torch.optim.Optimizer:
    """The non-private optimizer Opacus wraps."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return LARS(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_dp(
    module: nn.Module,
    dataset: Dataset,
    *,
    forward: ForwardFn,
    criterion: nn.Module,
    config: DPConfig,
    dataset_ids: tuple[str, ...],
    progress: Callable[[int, int, float], None] | None = None,
) -> DPResult:
    """DP-train the trainable parameters of ``module`` in place on ``dataset``.

    ``forward(module, batch)`` returns ``(outputs, targets)`` for ``criterion``; the criterion must
    have a ``reduction`` attribute and return one loss per example when it is ``"none"`` (the
    privacy unit is one dataset item). ``progress(step, total_steps, loss)`` is called per step.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingConfigError("The module has no trainable parameters; unfreeze what DP-SGD should train.")
    n = len(dataset)
    if n == 0:
        raise TrainingConfigError("The training data set is empty.")
    torch.manual_seed(config.seed)
    module.train()  # Opacus refuses eval-mode modules (from_pretrained returns eval mode)
    batch_size = min(config.batch_size, n)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optimizer = make_optimizer(params, config)
    started = time.perf_counter()
    if math.isinf(config.epsilon):
        losses = _train_plain(module, loader, forward, criterion, optimizer, config, progress)
        meta = PrivacyMetadata(math.inf, config.delta, dataset_ids)
        return DPResult(math.inf, 0.0, batch_size / n, len(losses), time.perf_counter() - started, meta, losses)
    losses, engine, noise_multiplier = _train_private(
        module, loader, forward, criterion, optimizer, config, progress
    )
    epsilon = engine.accountant.get_epsilon(delta=config.delta)
    meta = PrivacyMetadata.from_opacus(
        epsilon=epsilon, delta=config.delta, datasets=dataset_ids, accountant=engine.accountant,
        seeded=not config.secure_mode,
    )
    steps = sum(h.steps for h in meta.history)
    sample_rate = meta.history[0].sample_rate if meta.history else 0.0
    return DPResult(epsilon, noise_multiplier, sample_rate, steps, time.perf_counter() - started, meta, losses)


def _step(module, batch, forward, criterion, optimizer) -> float:
    """One physical step: gradients of this batch's loss, then the optimizer (DP or not)."""
    optimizer.zero_grad()
    outputs, targets = forward(module, batch)
    loss = criterion(outputs, targets)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _train_plain(module, loader, forward, criterion, optimizer, config, progress) -> list[float]:
    losses: list[float] = []
    total = config.epochs * len(loader)
    for _ in range(config.epochs):
        for batch in loader:
            losses.append(_step(module, batch, forward, criterion, optimizer))
            if progress:
                progress(len(losses), total, losses[-1])
    return losses


def _train_private(module, loader, forward, criterion, optimizer, config, progress):
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    # Seeded mode: noise from ``seed``, sampling from the global generator torch.manual_seed(seed)
    # set (reproducible, not private). Secure mode: both from secret urandom-seeded generators.
    generator = secure_generator() if config.secure_mode else torch.Generator().manual_seed(config.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        # Opacus' own secure_mode needs torchcsprng (see DPConfig); its sampler reads ``secure_rng``.
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=False)
        if config.secure_mode:
            engine.secure_rng = secure_generator()
        # = make_private_with_epsilon, with the calibration done by calibrate_noise (fast, cached).
        made = engine.make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=calibrate_noise(
                config.epsilon, config.delta, 1 / len(loader), config.epochs, config.accountant
            ),
            max_grad_norm=config.max_grad_norm, poisson_sampling=True,
            grad_sample_mode=config.grad_sample_mode, noise_generator=generator,
        )
    if config.grad_sample_mode == "ghost":
        dp_module, dp_optimizer, dp_criterion, dp_loader = made
    else:
        (dp_module, dp_optimizer, dp_loader), dp_criterion = made, criterion
    # Opacus' floating-point-robust noise (its optimizer's secure_mode flag needs no torchcsprng).
    dp_optimizer.secure_mode = config.secure_mode
    dp_module.train()
    physical = config.physical_batch_size or config.batch_size
    total = config.epochs * len(dp_loader)
    losses: list[float] = []
    with warnings.catch_warnings():
        # Opacus' hooks fire on frozen inputs by design; the warning says nothing about this run.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(config.epochs):
            with BatchMemoryManager(
                data_loader=dp_loader, max_physical_batch_size=physical, optimizer=dp_optimizer
            ) as memory_safe_loader:
                for batch in memory_safe_loader:
                    loss = _step(dp_module, batch, forward, dp_criterion, dp_optimizer)
                    if not dp_optimizer._is_last_step_skipped:  # one logical step done
                        losses.append(loss)
                        if progress:
                            progress(len(losses), total, losses[-1])
    _unwrap(dp_module)
    return losses, engine, dp_optimizer.noise_multiplier


def secure_generator() -> torch.Generator:
    """A CPU generator seeded with 64 bits of ``os.urandom``: nobody, this process included, can re-draw it."""
    return torch.Generator().manual_seed(secrets.randbits(64))


# Integer Rényi orders only: Opacus' default grid adds ~100 fractional orders that make the binary
# search ~10× slower for ~1 % less noise. The resulting σ is conservative: the ε recorded with the
# default grid afterwards is never above the target.
_CALIBRATION_ALPHAS = tuple(range(2, 65))


@functools.lru_cache(maxsize=256)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str = "rdp") -> float:
    """Noise multiplier σ that spends at most (ε, δ) in ``epochs`` epochs of Poisson rate ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    kwargs = {"alphas": list(_CALIBRATION_ALPHAS)} if accountant == "rdp" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order.*")  # the search probes extremes
        return get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, epochs=epochs,
            accountant=accountant, **kwargs,
        )


def _unwrap(dp_module) -> None:
    # Remove Opacus' hooks so the caller's module is a plain module again.
    if hasattr(dp_module, "_close"):
        dp_module._close()
