"""Store → load round trips are bit-exact for every supported architecture family and dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from hf_dpdedup import DedupedModel, FamilyStore

from conftest import example_inputs, in_own_memory, minilm_path, tiny_model

KINDS = ["bert", "bert-mlm", "roberta", "vit", "gpt2", "llama"]


def assert_same_model(original, loaded, inputs):
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    with torch.no_grad():
        out_a, out_b = original(**inputs), loaded(**inputs)
    first = out_a.logits if hasattr(out_a, "logits") else out_a.last_hidden_state
    second = out_b.logits if hasattr(out_b, "logits") else out_b.last_hidden_state
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_models_round_trip_bit_exact(tmp_path, kind, dtype):
    # The reference is what transformers itself loads from the original's safetensors folder:
    # in bf16 it keeps some non-persistent buffers (rotary inv_freq) in fp32, and so do we.
    tiny_model(kind).to(dtype).save_pretrained(tmp_path / "original")
    model = in_own_memory(type(tiny_model(kind)).from_pretrained(tmp_path / "original", dtype=dtype).eval())
    family = FamilyStore.create(tmp_path / "fam", block_size=128, dtype=dtype)
    family.add_model("m", model)
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    assert type(loaded) is type(model)
    assert_same_model(model, loaded, example_inputs(kind))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert-mlm"])
def test_tied_embeddings_are_tied_again(tmp_path, kind):
    model = tiny_model(kind, tie=True)
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("m", model)
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    out_emb, in_emb = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert out_emb is in_emb


def test_untied_llama_keeps_two_tensors(tmp_path):
    model = tiny_model("llama", tie=False)
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("m", model)
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert_same_model(model, loaded, example_inputs("llama"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_minilm_round_trip(tmp_path, minilm, dtype):
    model = minilm.to(dtype) if dtype != torch.float32 else minilm
    family = FamilyStore.create(tmp_path / "fam", block_size=16384, dtype=dtype)
    family.add_model("minilm", model, files_from=minilm_path())
    loaded = DedupedModel.from_pretrained(family.member_path("minilm"))
    assert (family.member_path("minilm") / "tokenizer.json").is_file()
    assert_same_model(model, loaded, example_inputs("bert"))
    minilm.float()


def test_two_copies_cost_one_plus_metadata(tmp_path, minilm):
    family = FamilyStore.create(tmp_path / "fam", block_size=16384)
    family.add_model("a", minilm, files_from=minilm_path())
    shard_bytes_one = sum(s.bytes for s in family.blocks.index.shards)
    rows_one = family.blocks.index.total_rows
    family.add_model("b", minilm, files_from=minilm_path())
    assert family.blocks.index.total_rows == rows_one
    assert sum(s.bytes for s in family.blocks.index.shards) == shard_bytes_one
    original = sum(t.numel() * t.element_size() for t in minilm.state_dict().values())
    # two members of one model: one copy of the weights plus small per-member metadata
    assert family.stored_bytes() < 1.05 * original
    for name in ("a", "b"):
        assert_same_model(minilm, DedupedModel.from_pretrained(family.member_path(name)), example_inputs("bert"))


def test_identical_blocks_within_a_model_are_stored_once(tmp_path):
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight.copy_(model.bert.encoder.layer[0].intermediate.dense.weight)
    family = FamilyStore.create(tmp_path / "fam", block_size=64)
    c = family.add_model("m", model)
    rows = c.all_rows
    assert len(set(rows)) < len(rows)
    assert family.blocks.index.total_rows == len(set(rows))
    assert_same_model(model, DedupedModel.from_pretrained(family.member_path("m")), example_inputs("bert"))


def test_appending_a_model_adds_only_its_new_rows(tmp_path):
    a, b = tiny_model("bert", seed=0), tiny_model("bert", seed=0)
    with torch.no_grad():
        b.classifier.weight.add_(1.0)  # small tensor: packed with the other small ones into shared rows
        b.bert.encoder.layer[0].output.dense.weight.mul_(2)  # 32*64 = 2048 elements = 16 rows of 128
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("a", a)
    before = family.blocks.index.total_rows
    shards_before = list(family.blocks.index.shards)
    family.add_model("b", b)
    # the changed weight's 16 rows, and the packed rows its classifier weight lies in (the rest are a's)
    packed = next(p for p in family.constitution("b").packed if p.name == "classifier.weight")
    spanned = (packed.offset + packed.numel - 1) // 128 - packed.offset // 128 + 1
    assert family.blocks.index.total_rows - before == 16 + spanned
    assert list(family.blocks.index.shards[: len(shards_before)]) == shards_before  # nothing rewritten
    for name, model in (("a", a), ("b", b)):
        assert_same_model(model, DedupedModel.from_pretrained(family.member_path(name)), example_inputs("bert"))


def test_dtype_and_device_are_honoured(tmp_path):
    model = tiny_model("bert")
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("m", model)
    loaded = DedupedModel.from_pretrained(family.member_path("m"), torch_dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.device.type == "cpu"
    auto = DedupedModel.from_pretrained(family.member_path("m"), device_map="auto")
    assert {p.device.type for p in auto.parameters()} == {"cpu"}


def test_loaded_model_saves_and_reloads_with_transformers(tmp_path):
    model = tiny_model("gpt2")
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("m", model)
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    loaded.save_pretrained(tmp_path / "plain")
    again = in_own_memory(type(model).from_pretrained(tmp_path / "plain").eval())
    assert_same_model(model, again, example_inputs("gpt2"))


def test_training_a_loaded_model_never_writes_into_the_store(tmp_path):
    model = tiny_model("bert")
    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("m", model)
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)  # in place on memory-mapped shard views: must copy on write
    fresh = DedupedModel.from_pretrained(family.member_path("m"), verify=True)
    assert_same_model(model, fresh, example_inputs("bert"))


def test_dedup_info_carries_privacy_metadata(tmp_path):
    from hf_dpdedup.privacy import PrivacyMetadata

    family = FamilyStore.create(tmp_path / "fam", block_size=128)
    family.add_model("m", tiny_model("bert"), privacy=PrivacyMetadata(2.0, 1e-5, ("sst2-private",)))
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    assert loaded.dedup_info.epsilon == 2.0 and loaded.dedup_info.delta == 1e-5
    assert loaded.dedup_info.store_id == family.blocks.store_id


def test_rebuilt_tensors_are_aligned_and_single_rows_compute_identically(tmp_path, minilm):
    """Batch-1 inputs take matrix-vector kernels that are sensitive to operand alignment."""
    from transformers import AutoTokenizer

    family = FamilyStore.create(tmp_path / "fam", block_size=16384)
    family.add_model("m", minilm, files_from=minilm_path())
    loaded = DedupedModel.from_pretrained(family.member_path("m"))
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = tokenizer(["a gripping , beautifully acted film ."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(minilm(**batch).pooler_output, loaded(**batch).pooler_output)
