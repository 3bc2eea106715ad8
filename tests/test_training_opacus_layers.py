"""GPT-2's Conv1D under Opacus: per-sample gradients and ghost norms match autograd."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_dpdedup.training import DPConfig, train_dp
from hf_dpdedup.training.opacus_layers import conv1d_grad_sample, conv1d_norm_sample


def _per_sample_autograd(layer: Conv1D, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    grads = []
    for xi, ui in zip(x, upstream):
        layer.zero_grad()
        (layer(xi.unsqueeze(0)) * ui.unsqueeze(0)).sum().backward()
        grads.append(layer.weight.grad.clone())
    return grads


def test_grad_and_norm_samplers_match_autograd():
    torch.manual_seed(0)
    layer = Conv1D(nf=3, nx=5)
    x, upstream = torch.randn(4, 6, 5), torch.randn(4, 6, 3)
    expected = _per_sample_autograd(layer, x, upstream)
    samples = conv1d_grad_sample(layer, [x], upstream)
    for got, want in zip(samples[layer.weight], expected):
        assert torch.allclose(got, want, atol=1e-5)
    norms = conv1d_norm_sample(layer, [x], upstream)[layer.weight]
    assert torch.allclose(norms, torch.stack([g.norm() for g in expected]), atol=1e-4)
    assert torch.allclose(samples[layer.bias], upstream.sum(1), atol=1e-6)


def test_a_tiny_gpt2_trains_under_ghost_clipping():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    model.transformer.wte.requires_grad_(False)
    model.transformer.wpe.requires_grad_(False)
    before = model.transformer.h[0].mlp.c_fc.weight.clone()
    ids = torch.randint(0, 16, (64, 8))

    def forward(module, batch):
        (x,) = batch
        positions = torch.arange(x.shape[1]).repeat(x.shape[0], 1)
        return module(input_ids=x, position_ids=positions).logits[:, :-1].transpose(1, 2), x[:, 1:]

    class PerSequenceCE(nn.Module):
        reduction = "mean"

        def forward(self, logits, targets):
            loss = nn.functional.cross_entropy(logits, targets, reduction="none").mean(1)
            return loss if self.reduction == "none" else loss.mean()

    result = train_dp(model, TensorDataset(ids), forward=forward, criterion=PerSequenceCE(),
                      config=DPConfig(epsilon=4.0, delta=1e-5, epochs=1, batch_size=16, lr=0.1),
                      dataset_ids=("toy",))
    assert result.steps == 4
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)
