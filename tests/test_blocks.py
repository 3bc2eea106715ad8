"""Block layout: the cut is exact, extras and aliases are kept, dtypes are never changed."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from block_support import rebuild_from_matrix
from hf_dpdedup.blocks import plan_layout, to_block_matrix, check_block_size
from hf_dpdedup.errors import BlockLayoutError, DtypeMismatchError, HfDpDedupError

from conftest import tiny_model


def roundtrip(sd, block_size):
    layout = plan_layout(sd, block_size)
    matrix = to_block_matrix(sd, layout)
    extras = {k: sd[k] for k in layout.extras}
    return layout, matrix, rebuild_from_matrix(matrix, layout, extras)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=5),
    block_size=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_cut_then_rebuild_is_bit_exact(shapes, block_size, dtype):
    g = torch.Generator().manual_seed(len(shapes) * 31 + block_size)
    sd = {f"t{i}": torch.randn(*s, generator=g).to(dtype) for i, s in enumerate(shapes)}
    layout, matrix, back = roundtrip(sd, block_size)
    assert matrix.dtype == dtype
    assert matrix.shape == (sum(math.ceil(t.numel() / block_size) for t in sd.values() if t.numel() >= block_size), block_size)
    for name, tensor in sd.items():
        assert back[name].dtype == dtype
        assert torch.equal(back[name].contiguous().view(torch.uint8), tensor.view(torch.uint8))  # bitwise
    for spec in layout.tensors:  # padding is zeros
        last = matrix[spec.first_block + spec.n_blocks - 1]
        used = spec.numel - (spec.n_blocks - 1) * block_size
        assert torch.count_nonzero(last[used:]) == 0


def test_small_and_integer_tensors_stay_extras():
    sd = {"w": torch.randn(8, 8), "b": torch.randn(8), "ids": torch.arange(100)}
    layout = plan_layout(sd, 16)
    assert [t.name for t in layout.tensors] == ["w"]
    assert set(layout.extras) == {"b", "ids"}
    assert layout.tensors[0].n_blocks == 4


def test_tied_tensors_are_laid_out_once():
    model = tiny_model("gpt2")
    sd = model.state_dict()
    layout = plan_layout(sd, 64)
    assert layout.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in {t.name for t in layout.tensors}


def test_mixed_block_dtypes_are_a_clear_error():
    sd = {"a": torch.randn(64), "b": torch.randn(64).half()}
    with pytest.raises(DtypeMismatchError, match="model.to"):
        plan_layout(sd, 16)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "64", True, None])
def test_block_size_must_be_a_positive_integer(bad):
    with pytest.raises(BlockLayoutError, match="positive integer") as info:
        check_block_size(bad)
    assert isinstance(info.value, HfDpDedupError)


def test_meta_tensors_are_refused():
    with pytest.raises(BlockLayoutError, match="meta"):
        plan_layout({"w": torch.empty(64, device="meta")}, 16)
