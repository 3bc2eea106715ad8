"""DedupedModel.from_pretrained and hf_dpdedup.pipeline take transformers 5's keywords."""

from __future__ import annotations

import shutil

import pytest
import torch

from hf_dpdedup import DedupedModel, pipeline
from hf_dpdedup.errors import LoadArgumentError

from hub_support import hub, logits, make_family, models  # noqa: F401


@pytest.fixture(scope="module")
def family(models, tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("kwargs") / "tiny", models)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value", [torch.float16, "float16"])
def test_dtype_and_its_transformers_4_alias(family, models, key, value):
    model = DedupedModel.from_pretrained(family.member_path("m1"), **{key: value})
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    expected = models["m1"].state_dict()
    assert all(torch.equal(v, expected[k].to(torch.float16)) for k, v in model.state_dict().items())


def test_dtype_auto_keeps_the_stored_dtype(family):
    model = DedupedModel.from_pretrained(family.member_path("m0"), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_conflicting_dtypes_are_refused(family):
    with pytest.raises(LoadArgumentError, match="pass only dtype"):
        DedupedModel.from_pretrained(family.member_path("m0"), dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_config_overrides_as_in_transformers(family, models):
    model = DedupedModel.from_pretrained(family.member_path("m2"), output_hidden_states=True, num_labels=2,
                                         id2label={0: "neg", 1: "pos"}, attn_implementation="eager")
    assert model.config.output_hidden_states and model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config._attn_implementation == "eager"
    expected = models["m2"].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert torch.allclose(logits(model), logits(models["m2"]), atol=1e-6)  # eager vs sdpa kernels


def test_an_explicit_config_replaces_config_json(family):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family.member_path("m0"))
    config.label2id = {"neg": 0, "pos": 1}
    model = DedupedModel.from_pretrained(family.member_path("m0"), config=config, output_attentions=True)
    assert model.config.label2id == {"neg": 0, "pos": 1} and model.config.output_attentions
    assert not config.output_attentions  # the caller's config is not modified


def test_unknown_keywords_are_a_typed_error(family):
    with pytest.raises(LoadArgumentError, match="nmu_labels"):
        DedupedModel.from_pretrained(family.member_path("m0"), nmu_labels=3)
    with pytest.raises(LoadArgumentError, match="positional"):
        DedupedModel.from_pretrained(family.member_path("m0"), "extra")


def test_keywords_the_auto_classes_pass_along_are_accepted(family):
    model = DedupedModel.from_pretrained(family.member_path("m0"), trust_remote_code=True, _from_auto=True,
                                         proxies=None, code_revision=None, adapter_kwargs={})
    assert model.dedup_info.name == "m0"


def test_subfolder(family, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(family.root, root / "family")
    model = DedupedModel.from_pretrained(root / "family" / "members", subfolder="m1")
    assert model.dedup_info.name == "m1"


def test_pipeline_infers_the_task_and_takes_transformers_keywords(family, models):
    classify = pipeline(model=family.member_path("m2"), top_k=None, device=-1, dtype="float32")
    assert classify.task == "text-classification" and classify.device.type == "cpu"
    scores = classify(["a very good film"])
    assert len(scores[0]) == 2  # top_k=None: every label
    tokens = classify.tokenizer(["a very good film"], return_tensors="pt")
    with torch.no_grad():
        expected = models["m2"](**tokens).logits.softmax(-1)[0]
    got = {d["label"]: d["score"] for d in scores[0]}
    assert got["LABEL_1"] == pytest.approx(float(expected[1]), abs=1e-6)


def test_pipeline_from_the_hub_with_a_positional_task(hub, family, tmp_path):
    from hf_dpdedup import push_family_to_hub

    push_family_to_hub(family, "alice", token="hf_write", endpoint=hub.url)
    classify = pipeline("sentiment-analysis", "alice/tiny-m0", endpoint=hub.url, cache_dir=tmp_path / "c",
                        dtype=torch.float16, model_kwargs={"output_hidden_states": True})
    assert classify.model.dtype == torch.float16 and classify.model.config.output_hidden_states
    assert classify.model.dedup_info.repo_id == "alice/tiny-m0"
