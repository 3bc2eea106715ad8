"""One DP-SGD run: budget validation, accountant consistency, modes, batches, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from hf_dpdedup.errors import TrainingConfigError
from hf_dpdedup.training import DPConfig, train_dp


def _data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _forward(module, batch):
    x, y = batch
    return module(x), y


def _run(**overrides):
    cfg = dict(epsilon=4.0, delta=1e-5, epochs=2, batch_size=64, lr=0.5, seed=0)
    cfg.update(overrides)
    model = _model()
    result = train_dp(model, _data(), forward=_forward, criterion=nn.CrossEntropyLoss(),
                      config=DPConfig(**cfg), dataset_ids=("toy",))
    return model, result


@pytest.mark.parametrize(
    "epsilon, delta",
    [(0.0, 1e-5), (-1.0, 1e-5), (float("nan"), 1e-5), (1.0, 1.0), (1.0, 1.5), (1.0, 0.0)],
)
def test_invalid_budget_rejected(epsilon, delta):
    with pytest.raises(TrainingConfigError):
        DPConfig(epsilon=epsilon, delta=delta)


@pytest.mark.parametrize("field, value", [("optimizer", "rmsprop"), ("grad_sample_mode", "ew"), ("epochs", 0), ("lr", 0.0)])
def test_invalid_hyper_parameters_rejected(field, value):
    with pytest.raises(TrainingConfigError):
        DPConfig(epsilon=1.0, delta=1e-5, **{field: value})


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_recorded_epsilon_matches_a_rebuilt_accountant(mode):
    _, result = _run(grad_sample_mode=mode)
    meta = result.metadata
    assert meta.accountant == "rdp" and meta.datasets == ("toy",)
    rebuilt = RDPAccountant()
    rebuilt.history = [h.as_opacus() for h in meta.history]
    assert rebuilt.get_epsilon(delta=meta.delta) == pytest.approx(meta.epsilon, rel=1e-12)
    assert meta.epsilon <= 4.0 + 1e-6  # calibrated to the target
    assert result.steps == 2 * 4 and meta.history[0].sample_rate == pytest.approx(0.25)
    assert result.noise_multiplier == meta.history[0].noise_multiplier > 0


def test_smaller_epsilon_gets_more_noise():
    _, low = _run(epsilon=1.0)
    _, high = _run(epsilon=8.0)
    assert low.noise_multiplier > high.noise_multiplier


def test_seeded_mode_same_seed_same_weights_other_seed_other_weights():
    a, ra = _run(secure_mode=False)
    b, _ = _run(secure_mode=False)
    c, _ = _run(secure_mode=False, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert ra.metadata.seeded and ra.metadata.to_dict()["seeded"] is True
    assert "not a privacy guarantee" in ra.metadata.to_dict()["noise"]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_default_run_is_not_reproducible_from_its_recorded_arguments(mode):
    """Issue 13 (critical 2): retraining with the recorded arguments under each neighbouring data set
    must not reproduce the released weights, or the data set is identified with certainty."""
    config = DPConfig(epsilon=4.0, delta=1e-5, epochs=2, batch_size=64, lr=0.5, grad_sample_mode=mode)
    assert config.secure_mode and DPConfig(**config.to_dict()) == config  # the record rebuilds the config
    runs = []
    for _ in range(2):
        model = _model()
        result = train_dp(model, _data(), forward=_forward, criterion=nn.CrossEntropyLoss(),
                          config=DPConfig(**config.to_dict()), dataset_ids=("toy",))
        runs.append(model)
        assert not result.metadata.seeded and result.metadata.to_dict()["seeded"] is False
    assert not all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_physical_batches_keep_logical_step_count(mode):
    _, result = _run(physical_batch_size=16, grad_sample_mode=mode)
    assert result.steps == 8 and len(result.losses) == 8


def test_lars_and_adam_run_under_opacus():
    for name, lr in (("lars", 1.0), ("adam", 1e-2)):
        model, result = _run(optimizer=name, lr=lr)
        assert math.isfinite(result.losses[-1])
        assert not torch.equal(model[0].weight, _model()[0].weight)


def test_frozen_parameters_do_not_move():
    model = _model()
    model[0].requires_grad_(False)
    before = model[0].weight.clone()
    train_dp(model, _data(), forward=_forward, criterion=nn.CrossEntropyLoss(),
             config=DPConfig(epsilon=2.0, delta=1e-5, epochs=1, batch_size=64), dataset_ids=("toy",))
    assert torch.equal(model[0].weight, before)
    assert not hasattr(model[2].weight, "grad_sample") or model[2].weight.grad_sample is None


def test_infinite_epsilon_trains_without_noise_and_learns():
    model, result = _run(epsilon=math.inf, epochs=10, lr=0.5)
    assert result.metadata.epsilon == math.inf and result.metadata.history == ()
    x, y = _data().tensors
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_no_trainable_parameters_is_a_config_error():
    model = _model().requires_grad_(False)
    with pytest.raises(TrainingConfigError, match="no trainable"):
        train_dp(model, _data(), forward=_forward, criterion=nn.CrossEntropyLoss(),
                 config=DPConfig(epsilon=1.0, delta=1e-5), dataset_ids=("toy",))
