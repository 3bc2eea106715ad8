"""DP-LoRA members: the --lora syntax, the accountant, what trains, the adapter/merged folders, the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_dpdedup.cli import train_family as cli
from hf_dpdedup.errors import TrainingConfigError
from hf_dpdedup.training import DPConfig, load_privacy, train_members, train_text_family
from hf_dpdedup.training.heads import batch_inputs
from hf_dpdedup.training.lora import LoraMemberSaver, LoraSpec, parse_lora_spec, trainable_names, wrap_lora
from hf_dpdedup.training.tasks import mean_score, next_token_accuracy

from test_training_family import make_base, make_data

LORA = "r=4,alpha=8,target_modules=query+value"
EPSILONS = ["2", "8"]


# --- the --lora syntax -----------------------------------------------------------------------------
def test_a_full_spec_parses_into_the_dataclass():
    spec = parse_lora_spec("r=8, alpha=16,target_modules=query+value,dropout=0.1")
    assert spec == LoraSpec(r=8, alpha=16, target_modules=("query", "value"), dropout=0.1)
    assert spec.to_dict() == {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.1}
    assert parse_lora_spec("alpha=0.5,r=2") == LoraSpec(r=2, alpha=0.5, target_modules=None, dropout=0.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("r=8", "lacks alpha"),
        ("r=8,alpha=16,rank=3", "accepted keys: r, alpha, target_modules, dropout"),
        ("r8,alpha=16", "key=value"),
        ("r=,alpha=16", "key=value"),
        ("r=8,alpha=16,r=4", "twice"),
        ("r=eight,alpha=16", "not an integer"),
        ("r=2.5,alpha=16", "not an integer"),
        ("r=0,alpha=16", "r must be an integer ≥ 1"),
        ("r=8,alpha=-1", "alpha must be a finite number > 0"),
        ("r=8,alpha=inf", "alpha must be a finite number > 0"),
        ("r=8,alpha=16,dropout=1.5", r"dropout must be in \[0, 1\)"),
        ("r=8,alpha=16,target_modules=query++value", "Empty module name"),
    ],
)
def test_bad_specs_get_the_typed_error_naming_what_is_accepted(text, message):
    with pytest.raises(TrainingConfigError, match=message):
        parse_lora_spec(text)


# --- a SEQ_CLS family through the CLI, saved both ways -----------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train-family", *argv])


def _cli_argv(base, data, out, *extra):
    # --seeded-noise (test only): the adapter and merged runs must train the same weights.
    return ["--base", str(base), "--data", str(data), "--epsilons", *EPSILONS, "--delta", "1e-5",
            "--out", str(out), "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--optimizer", "adam",
            "--max-length", "8", "--no-progress", "--seeded-noise", *extra]


@pytest.fixture(scope="module")
def cls_family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    data = write_data(tmp / "data")
    base = make_base(tmp / "base")
    for mode in ("adapter", "merged"):
        args = _parse(_cli_argv(base, data, tmp / mode, "--lora", LORA, "--save", mode))
        assert args.func(args) == 0
    return tmp


def write_data(folder):
    """train/dev/test TSVs of the toy sentiment task."""
    folder.mkdir()
    for name, n, seed in (("train", 120, 0), ("dev", 24, 1), ("test", 24, 2)):
        d = make_data(n, seed)
        rows = "".join(f"{y}\t{t}\n" for t, y in zip(d.texts, d.labels))
        (folder / f"{name}.tsv").write_text("label\tsentence\n" + rows)
    return folder


def _cls_base(tmp):
    return AutoModelForSequenceClassification.from_pretrained(tmp / "base", num_labels=2).eval()


def _val_logits(model, member_dir):
    tok = AutoTokenizer.from_pretrained(member_dir)
    enc = tok(list(make_data(24, 1).texts), padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch_inputs(enc["input_ids"], enc["attention_mask"])).logits


def test_adapter_members_follow_the_contract(cls_family):
    for eps in EPSILONS:
        member = cls_family / "adapter" / f"eps-{eps}"
        files = {p.name for p in member.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "privacy.json", "training_args.json",
                "tokenizer_config.json"} <= files
        assert "model.safetensors" not in files
        config = json.loads((member / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(cls_family / "base")
        assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA"
        assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["query", "value"]
        args = json.loads((member / "training_args.json").read_text())
        assert args["saved_as"] == "adapter" and args["strategy"] == "lora"
        assert args["lora"] == {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "lora_dropout": 0.0}
        weights = load_file(member / "adapter_model.safetensors")
        assert weights and all("lora_" in k or "classifier" in k for k in weights)
        assert any("classifier" in k for k in weights)  # the head, via modules_to_save
    merged_args = json.loads((cls_family / "merged" / "eps-8" / "training_args.json").read_text())
    assert merged_args["saved_as"] == "merged" and merged_args["lora"]["r"] == 4


def test_recorded_epsilon_is_the_accountants_for_the_history(cls_family):
    sigmas = []
    for mode in ("adapter", "merged"):
        for eps in EPSILONS:
            meta = load_privacy(cls_family / mode / f"eps-{eps}")
            accountant = RDPAccountant()
            accountant.history = [h.as_opacus() for h in meta.history]
            assert meta.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
            assert meta.epsilon <= float(eps) + 1e-6 and meta.seeded
            assert sum(h.steps for h in meta.history) == 2 * 4
            sigmas.append(meta.history[0].noise_multiplier)
    assert sigmas[0] > sigmas[1]


def test_only_the_adapter_and_head_train_and_the_base_is_bit_identical(cls_family):
    args = json.loads((cls_family / "adapter" / "eps-8" / "training_args.json").read_text())
    trained = args["trained_parameters"]
    assert trained and all("lora_" in n or "classifier.modules_to_save" in n for n in trained)
    assert set(args["changed_tensors"]) <= set(trained)
    assert any("lora_B" in n for n in args["changed_tensors"])  # lora_B starts at 0: it moved
    # The merged member: untargeted tensors are the base's bit for bit; query/value and the head moved.
    base = {f"bert.{k}": v for k, v in load_file(cls_family / "base" / "model.safetensors").items()}
    merged = load_file(cls_family / "merged" / "eps-8" / "model.safetensors")
    changed = {k for k in merged if k in base and not torch.equal(merged[k], base[k])}
    assert changed == {f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}


def test_an_adapter_reloads_with_peft_and_scores_what_was_recorded(cls_family):
    for eps in EPSILONS:
        member = cls_family / "adapter" / f"eps-{eps}"
        model = PeftModel.from_pretrained(_cls_base(cls_family), member).eval()
        logits = _val_logits(model, member)
        recorded = json.loads((member / "training_args.json").read_text())["public_val_accuracy"]
        labels = torch.tensor(make_data(24, 1).labels)
        assert mean_score((logits.argmax(1) == labels).float()) == pytest.approx(recorded, abs=1e-6)
        again = _val_logits(PeftModel.from_pretrained(_cls_base(cls_family), member).eval(), member)
        assert torch.equal(logits, again)  # the classifier comes from the adapter, not the fresh base init


def test_merged_members_equal_the_merged_adapter(cls_family):
    for eps in EPSILONS:
        adapter = PeftModel.from_pretrained(_cls_base(cls_family), cls_family / "adapter" / f"eps-{eps}")
        merged_adapter = adapter.merge_and_unload().state_dict()
        member = cls_family / "merged" / f"eps-{eps}"
        merged = AutoModelForSequenceClassification.from_pretrained(member).state_dict()
        assert merged.keys() == merged_adapter.keys()
        for name, tensor in merged.items():
            assert torch.equal(tensor, merged_adapter[name]), name
        assert {p.name for p in member.iterdir()} >= {"config.json", "model.safetensors", "privacy.json"}


# --- a CAUSAL_LM (GPT-2, Conv1D) family through train_members, hooks mode, both save modes ------------
class _SentenceLoss(torch.nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, packed):
        ids, mask = packed[:, 0], packed[:, 1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        per = (loss * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1).clamp(min=1)
        return per if self.reduction == "none" else per.mean()


def _lm_forward(module, batch):
    (packed,) = batch
    ids, mask = packed[:, 0], packed[:, 1]
    return module(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).repeat(len(ids), 1)).logits, packed


def _lm_utility(model, packed):
    model.eval()
    with torch.no_grad():
        logits, _ = _lm_forward(model, (packed,))
    model.train()
    return mean_score(next_token_accuracy(logits, packed[:, 0], packed[:, 1]))


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp / "base")
    original = load_file(tmp / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (96, 8), generator=g)
    packed = torch.stack([ids, torch.ones_like(ids)], dim=1)
    peft_model = wrap_lora(GPT2LMHeadModel.from_pretrained(tmp / "base"), LoraSpec(r=2, alpha=4, target_modules=("c_attn", "c_fc")),
                           task_type="CAUSAL_LM", seed=3, base_name=tmp / "base")
    rows = train_members(
        model=peft_model, module=peft_model, train_set=TensorDataset(packed), forward=_lm_forward,
        criterion=_SentenceLoss(), evaluate=lambda m: (_lm_utility(m, packed[:32]), _lm_utility(m, packed[32:64])),
        epsilons=[4.0, 8.0], config=DPConfig(epsilon=1.0, delta=1e-5, epochs=2, batch_size=32, lr=0.05,
                                             optimizer="adam", grad_sample_mode="hooks", seed=0, secure_mode=False),
        out=tmp / "fam", dataset_id="toy-lm", trained_names=trainable_names(peft_model),
        saver=LoraMemberSaver({"adapter": tmp / "fam" / "adapter", "merged": tmp / "fam" / "merged"}),
        extra_args={"lora": {"r": 2}},
    )
    return tmp, rows, peft_model, original, packed


def test_lm_members_are_saved_both_ways_and_the_base_weights_never_move(lm_family):
    tmp, rows, peft_model, original, _ = lm_family
    assert [r.path for r in rows] == [str(tmp / "fam" / "adapter" / f"eps-{e}") for e in ("4", "8")]
    config = json.loads((tmp / "fam" / "adapter" / "eps-8" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is True  # GPT-2's Conv1D
    # In memory, after the last member: every non-adapter parameter is the base's, bit for bit.
    names = dict(peft_model.get_base_model().named_parameters())
    base_names = {n.replace(".base_layer", ""): n for n in names if "lora_" not in n}
    for name, tensor in original.items():
        assert torch.equal(names[base_names[name]].detach(), tensor), name
    assert all("lora_" in n for n in trainable_names(peft_model))
    for row in rows:
        meta = load_privacy(row.path)
        accountant = RDPAccountant()
        accountant.history = [h.as_opacus() for h in meta.history]
        assert meta.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)


def test_lm_adapter_reloads_with_identical_logits_and_merges_to_the_merged_member(lm_family):
    tmp, _, peft_model, _, packed = lm_family
    adapter_dir, merged_dir = tmp / "fam" / "adapter" / "eps-8", tmp / "fam" / "merged" / "eps-8"
    reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp / "base"), adapter_dir).eval()
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(_lm_forward(reloaded, (packed,))[0], _lm_forward(peft_model, (packed,))[0])
    merged = GPT2LMHeadModel.from_pretrained(merged_dir).state_dict()
    expected = reloaded.merge_and_unload().state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert any(not torch.equal(merged[k], v) for k, v in load_file(tmp / "base" / "model.safetensors").items())


# --- CLI refusals (before anything is loaded) ---------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "r=8,alpha=16", "--strategy", "top-cls"], "cannot be combined with --strategy top-cls"),
        (["--lora", "r=8,alpha=16", "--strategy", "direct"], "cannot be combined"),
        (["--strategy", "lora"], "needs the adapter's shape"),
        (["--save", "merged"], "LoRA members only"),
        (["--lora", "r=8,alpha=16,rank=2"], "accepted keys"),
        (["--lora", "r=8"], "lacks alpha"),
    ],
)
def test_cli_refuses_bad_lora_requests(tmp_path, extra, message):
    args = _parse(["--base", "unused", "--data", str(write_data(tmp_path / "data")), "--epsilons", "1", "--delta", "1e-5",
                   "--out", str(tmp_path / "o"), *extra])
    with pytest.raises(TrainingConfigError, match=message):
        args.func(args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "strategy, lora, save_as, message",
    [("top-cls", LoraSpec(), "adapter", "cannot be combined with 'top-cls'"),
     ("lora", None, "adapter", "needs the adapter's shape"),
     ("lora", LoraSpec(), "both", "Save a LoRA member as one of")],
)
def test_the_api_refuses_inconsistent_lora_requests_before_loading(tmp_path, strategy, lora, save_as, message):
    with pytest.raises(TrainingConfigError, match=message):
        train_text_family(base="unused", train=make_data(16, 0), public_val=make_data(8, 1),
                          public_test=make_data(8, 2), epsilons=[1.0], config=DPConfig(epsilon=1.0, delta=1e-5),
                          out=tmp_path / "o", dataset_id="toy", strategy=strategy, lora=lora, save_as=save_as)
    assert not (tmp_path / "o").exists()
