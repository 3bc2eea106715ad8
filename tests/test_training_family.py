"""A tiny 3-member text-classification family: saved folders, privacy records, tensors, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, BertTokenizer, ViTConfig

from hf_dpdedup.errors import TrainingConfigError
from hf_dpdedup.training import DPConfig, TextClassificationData, load_privacy, train_text_family
from hf_dpdedup.training import family as family_module
from hf_dpdedup.training import text as text_module
from hf_dpdedup.training.heads import batch_inputs

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", "film", "plot", "a", "the"]
EPSILONS = [1.0, 2.0, 8.0]


def make_base(path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    BertModel(config).save_pretrained(path)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(path)
    return path


def make_data(n: int, seed: int) -> TextClassificationData:
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        adjective = ["bad", "awful", "good", "great"][2 * label + int(torch.randint(0, 2, (1,), generator=g))]
        noun = ["film", "plot"][int(torch.randint(0, 2, (1,), generator=g))]
        texts.append(f"a {adjective} {noun}" if torch.rand(1, generator=g) < 0.5 else f"the {noun} {adjective}")
        labels.append(label)
    return TextClassificationData(tuple(texts), tuple(labels))


# Seeded on purpose (test only): test_a_member_does_not_depend_on_its_siblings compares two runs.
CONFIG = DPConfig(epsilon=1.0, delta=1e-5, epochs=2, batch_size=32, lr=0.5, seed=0, secure_mode=False)


def build(tmp, out_name="family", epsilons=EPSILONS, strategy="top-cls", base=None):
    return train_text_family(
        base=base or make_base(tmp / "base"), train=make_data(128, 0), public_val=make_data(32, 1),
        public_test=make_data(48, 2), epsilons=epsilons, config=CONFIG, out=tmp / out_name,
        dataset_id="toy", strategy=strategy, max_length=8,
    )


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fam")
    return tmp, build(tmp)


def test_members_are_full_transformers_folders(family):
    tmp, rows = family
    assert [r.epsilon for r in rows] == EPSILONS
    for row in rows:
        files = {p.name for p in (tmp / "family" / f"eps-{row.epsilon:g}").iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "privacy.json", "training_args.json"} <= files
    assert json.loads((tmp / "family" / "family.json").read_text())["members"][0]["epsilon"] == 1.0


def test_recorded_epsilon_is_the_accountants_for_the_history(family):
    tmp, rows = family
    for row in rows:
        meta = load_privacy(row.path)
        accountant = RDPAccountant()
        accountant.history = [h.as_opacus() for h in meta.history]
        assert meta.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
        assert meta.epsilon <= row.epsilon + 1e-6 and meta.datasets == ("toy",)
        assert sum(h.steps for h in meta.history) == row.steps == 2 * 4
    sigmas = [r.noise_multiplier for r in rows]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > sigmas[-1]


def test_only_the_top_changes_and_the_rest_is_the_base(family):
    tmp, rows = family
    base = {f"bert.{k}": v for k, v in load_file(tmp / "base" / "model.safetensors").items()}
    args = json.loads((tmp / "family" / "eps-8" / "training_args.json").read_text())
    member = load_file(tmp / "family" / "eps-8" / "model.safetensors")
    trained = set(args["trained_parameters"])
    assert "bert.encoder.layer.1.output.dense.weight" in trained and "classifier.weight" in trained
    assert not any(".attention.self." in n or "embeddings" in n or ".layer.0." in n for n in trained)
    assert set(args["changed_tensors"]) <= trained
    assert "bert.encoder.layer.1.intermediate.dense.weight" in args["changed_tensors"]
    for name, tensor in member.items():
        if name not in trained and name in base:
            assert torch.equal(tensor, base[name]), name
    others = load_file(tmp / "family" / "eps-1" / "model.safetensors")
    assert not torch.equal(others["classifier.weight"], member["classifier.weight"])


def test_recorded_accuracy_is_what_the_saved_model_scores(family):
    tmp, rows = family
    test = make_data(48, 2)
    for row in rows:
        model = AutoModelForSequenceClassification.from_pretrained(row.path).eval()
        tok = AutoTokenizer.from_pretrained(row.path)
        enc = tok(list(test.texts), padding="max_length", max_length=8, truncation=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch_inputs(enc["input_ids"], enc["attention_mask"])).logits
        accuracy = (logits.argmax(1) == torch.tensor(test.labels)).float().mean().item()
        assert accuracy == pytest.approx(row.public_test_accuracy, abs=1e-6)


def test_a_member_does_not_depend_on_its_siblings(family, tmp_path):
    tmp, _ = family
    (alone,) = build(tmp, out_name="alone", epsilons=[2.0], base=tmp / "base")
    a = load_file(tmp / "alone" / "eps-2" / "model.safetensors")
    b = load_file(tmp / "family" / "eps-2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_direct_strategy_trains_the_encoder_with_per_batch_position_ids(tmp_path):
    (row,) = build(tmp_path, epsilons=[4.0], strategy="direct")
    args = json.loads((tmp_path / "family" / "eps-4" / "training_args.json").read_text())
    assert "bert.encoder.layer.0.attention.self.query.weight" in args["changed_tensors"]
    assert not any("embeddings" in n for n in args["changed_tensors"])
    assert row.steps == 8 and math.isfinite(row.public_test_accuracy)


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started despite invalid input")

    monkeypatch.setattr(family_module, "train_dp", fail)
    monkeypatch.setattr(text_module, "load_base", fail)


@pytest.mark.parametrize(
    "epsilons, delta, train",
    [([1.0, 0.0], 1e-5, None), ([-2.0], 1e-5, None), ([1.0], 1.0, None), ([1.0, 1.0], 1e-5, None),
     ([], 1e-5, None), ([1.0], 1e-5, TextClassificationData((), ())),
     ([1.0], 1e-5, TextClassificationData(("a film",) * 4, (1,) * 4))],
)
def test_bad_requests_fail_before_training(tmp_path, no_training, epsilons, delta, train):
    with pytest.raises(TrainingConfigError):
        train_text_family(
            base=tmp_path / "base", train=make_data(16, 0) if train is None else train, public_val=make_data(8, 1),
            public_test=make_data(8, 2), epsilons=epsilons, config=DPConfig(epsilon=1.0, delta=delta),
            out=tmp_path / "out", dataset_id="toy",
        )
    assert not (tmp_path / "out").exists()


def test_a_base_that_cannot_classify_is_rejected_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(family_module, "train_dp", lambda *a, **k: pytest.fail("training started"))
    ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
              intermediate_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(TrainingConfigError, match="sequence classification"):
        build(tmp_path, base=tmp_path / "vit")
    with pytest.raises(TrainingConfigError, match="Cannot load"):
        build(tmp_path, base=tmp_path / "missing")
