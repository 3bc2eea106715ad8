"""Block saliency: measures, aggregates over valid elements only, public calibration only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.blocks import plan_layout
from hf_dpdedup.dedup.saliency import (
    AGGREGATES,
    MEASURES,
    CalibrationRequiredError,
    SaliencyError,
    aggregate_blocks,
    block_saliency,
    saliency_order,
)
from hf_dpdedup.errors import PrivateDataAccessError
from hf_dpdedup.privacy import PrivateDataset

from conftest import example_inputs, tiny_model

NUMPY_AGGREGATE = {
    "mean": np.mean,
    "l1": lambda x: np.abs(x).sum(),
    "l2": np.linalg.norm,
    "linf": lambda x: np.abs(x).max(),
    "q3": lambda x: np.quantile(x, 0.75),
}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=40),
       st.integers(1, 9), st.sampled_from(AGGREGATES))
def test_aggregates_use_valid_elements_only(values, block_size, aggregate):
    w = torch.tensor(values, dtype=torch.float32)
    sd = {"w": w}
    if w.numel() < block_size:
        return  # an extra, not a block
    got = block_saliency(sd, plan_layout(sd, block_size), aggregate=aggregate)
    magnitudes = np.abs(w.double().numpy())
    chunks = [magnitudes[i : i + block_size] for i in range(0, len(values), block_size)]  # last one short: no padding
    expected = [NUMPY_AGGREGATE[aggregate](c) for c in chunks]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_padding_does_not_dilute_the_last_block():
    sd = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 8.0, 8.0])}  # blocks [1,1,1,1] and [8,8,pad,pad]
    layout = plan_layout(sd, 4)
    assert block_saliency(sd, layout, aggregate="mean").tolist() == [1.0, 8.0]
    assert block_saliency(sd, layout, aggregate="q3").tolist() == [1.0, 8.0]


def test_aggregate_blocks_places_each_tensor_at_its_rows():
    sd = {"a": torch.full((3, 3), 2.0), "b": torch.full((5,), -1.0)}
    layout = plan_layout(sd, 4)  # a: rows 0-2, b: rows 3-4
    assert aggregate_blocks(sd, layout, "linf").tolist() == [2.0, 2.0, 2.0, 1.0, 1.0]


def test_saliency_order_is_ascending_and_stable():
    scores = torch.tensor([0.5, 0.1, 0.5, 0.1, float("nan"), 0.0], dtype=torch.float64)
    assert saliency_order(scores).tolist() == [5, 1, 3, 0, 2, 4]


@pytest.fixture(scope="module")
def bert():
    model = tiny_model("bert")
    batch = {**example_inputs("bert"), "labels": torch.tensor([0, 1])}
    return model, plan_layout(model.state_dict(), 512), batch


@pytest.mark.parametrize("measure", MEASURES)
def test_every_measure_and_aggregate_is_finite_and_leaves_the_model_alone(bert, measure):
    model, layout, batch = bert
    model.train()
    model.classifier.weight.grad = marker = torch.ones_like(model.classifier.weight)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen, as in many DP families
    try:
        for aggregate in AGGREGATES:
            scores = block_saliency(model, layout, measure=measure, aggregate=aggregate, calibration=[batch, batch])
            assert scores.shape == (layout.n_blocks,) and scores.dtype == torch.float64
            assert bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())
        assert model.training and all(m.training for m in model.modules())
        assert model.classifier.weight.grad is marker
        assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
        assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    finally:
        model.eval()
        model.classifier.weight.grad = None
        model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    if measure != "magnitude":  # frozen weights are still scored by their gradient
        spec = next(s for s in layout.tensors if s.name == "bert.embeddings.word_embeddings.weight")
        assert scores[spec.first_block : spec.first_block + spec.n_blocks].sum() > 0


def test_gradient_saliency_depends_on_the_calibration_batches(bert):
    model, layout, batch = bert
    other = {**example_inputs("bert", seed=7), "labels": torch.tensor([1, 1])}
    for measure in ("gradient", "fisher"):
        a = block_saliency(model, layout, measure=measure, calibration=[batch])
        b = block_saliency(model, layout, measure=measure, calibration=[other])
        assert not torch.allclose(a, b)
        capped = block_saliency(model, layout, measure=measure, calibration=[batch, other], max_batches=1)
        torch.testing.assert_close(capped, a)


def test_fisher_is_the_squared_gradient_for_one_batch():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    layout = plan_layout(model.state_dict(), 12)  # the weight is one block
    batch = {"x": torch.randn(5, 4), "y": torch.randn(5, 3)}
    loss = lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"])  # noqa: E731
    grad = block_saliency(model, layout, measure="gradient", aggregate="linf", calibration=[batch], loss_fn=loss)
    fisher = block_saliency(model, layout, measure="fisher", aggregate="linf", calibration=[batch], loss_fn=loss)
    torch.testing.assert_close(fisher, grad.square(), rtol=1e-5, atol=0)


def test_wanda_is_weight_times_input_rms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.ReLU(), torch.nn.Embedding(3, 4))
    model[2].weight.data.fill_(1.0)  # not a Linear: falls back to |W| = 1
    layout = plan_layout(model.state_dict(), 12)
    xs = [torch.randn(2, 5, 4), torch.randn(3, 5, 4)]
    run = lambda m, b: m[0](b["x"])  # noqa: E731
    got = block_saliency(model, layout, measure="wanda", aggregate="l1", calibration=[{"x": x} for x in xs], loss_fn=run)
    x = torch.cat([x.reshape(-1, 4) for x in xs]).double()
    rms = x.square().mean(0).sqrt()
    expected = (model[0].weight.detach().double().abs() * rms[None, :]).sum()
    torch.testing.assert_close(got, torch.tensor([expected.item(), 12.0], dtype=torch.float64))


def test_wanda_covers_gpt2_conv1d_and_tied_weights():
    model = tiny_model("gpt2")
    layout = plan_layout(model.state_dict(), 256)
    batch = example_inputs("gpt2")
    wanda = block_saliency(model, layout, measure="wanda", calibration=[batch])
    magnitude = block_saliency(model, layout)
    assert bool(torch.isfinite(wanda).all()) and not torch.allclose(wanda, magnitude)


def test_data_measures_need_public_calibration(bert):
    model, layout, batch = bert
    for measure in ("gradient", "fisher", "wanda"):
        with pytest.raises(CalibrationRequiredError, match="PUBLIC"):
            block_saliency(model, layout, measure=measure)
        with pytest.raises(CalibrationRequiredError):
            block_saliency(model, layout, measure=measure, calibration=[])
    with pytest.raises(SaliencyError):
        block_saliency(model.state_dict(), layout, measure="fisher", calibration=[batch])


def test_private_calibration_is_refused_without_touching_it(bert):
    model, layout, batch = bert
    private = PrivateDataset({k: v for k, v in batch.items()}, dataset_id="sst2-val",
                             public_size=len(batch["input_ids"]))
    loader = torch.utils.data.DataLoader(private, batch_size=None)  # a loader over it is refused too
    for calibration in (private, loader):
        for measure in ("gradient", "fisher", "wanda"):
            with pytest.raises(PrivateDataAccessError):
                block_saliency(model, layout, measure=measure, calibration=calibration)
    assert private.raw_accesses == 0 and private.charged_reads == 0
    assert all(p.grad is None for p in model.parameters())


def test_bad_requests_raise_typed_errors(bert):
    model, layout, batch = bert
    unlabeled = example_inputs("bert")
    with pytest.raises(SaliencyError, match="labels"):
        block_saliency(model, layout, measure="gradient", calibration=[unlabeled])
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    for kwargs in ({"measure": "taylor"}, {"aggregate": "median"}):
        with pytest.raises(SaliencyError):
            block_saliency(model, layout, **kwargs)
    with pytest.raises(SaliencyError):
        block_saliency(model, layout, measure="gradient", calibration=[batch], max_batches=0)
    with pytest.raises(SaliencyError, match="loss_fn"):
        block_saliency(model, layout, measure="wanda", calibration=[(batch["input_ids"],)])
    with pytest.raises(SaliencyError, match="state_dict"):
        block_saliency(tiny_model("roberta"), layout)  # a layout planned from another model


def test_buffers_rank_last_for_gradient_measures():
    model = torch.nn.Linear(4, 4)
    model.register_buffer("table", torch.zeros(16))
    layout = plan_layout(model.state_dict(), 8)
    batch = {"x": torch.randn(3, 4)}
    scores = block_saliency(model, layout, measure="fisher", aggregate="mean", calibration=[batch],
                            loss_fn=lambda m, b: m(b["x"]).square().sum())
    spec = next(s for s in layout.tensors if s.name == "table")
    buffer_rows = scores[spec.first_block : spec.first_block + spec.n_blocks]
    assert bool((buffer_rows >= scores.max()).all())
