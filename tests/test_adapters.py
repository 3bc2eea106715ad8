"""peft adapters as family members: store, deduplicate, load (local and Hub), merged, typed refusals."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_dpdedup import DedupedModel, FamilyStore, ServingPool, pipeline, push_family_to_hub
from hf_dpdedup.blocks import plan_layout
from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.tasks import classification_score
from hf_dpdedup.distributed import load_member_model
from hf_dpdedup.errors import AdapterError, AdapterNotSupportedError, ConstitutionError
from card_support import card_metadata
from hf_dpdedup.hub.remote import REMOTE_CODE
from hf_dpdedup.privacy import PrivacyMetadata
from hf_dpdedup.store.member import read_constitution
from hf_dpdedup.training.members import load_privacy

from conftest import example_inputs, tiny_model
from hub_support import hub, tiny_tokenizer  # noqa: F401

BLOCK = 64
LORA = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])


def save_base(folder: Path) -> Path:
    tiny_model("bert", seed=0).save_pretrained(folder)
    return folder


def adapter_on(base: Path, *, seed: int, noise: float = 0.0, teacher_seed: int = 5) -> peft.PeftModel:
    """A LoRA adapter (classifier trained too, via modules_to_save) with random non-zero lora_B:
    the teacher's adapter plus ``noise`` × its std of fresh noise."""
    import transformers

    model = get_peft_model(transformers.BertForSequenceClassification.from_pretrained(base), LoraConfig(**LORA))
    teacher = torch.Generator().manual_seed(teacher_seed)
    own = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                value = torch.randn(p.shape, generator=teacher) * (0.5 if "lora_B" in name else p.std().item() + 0.2)
                p.copy_(value + noise * value.std() * torch.randn(p.shape, generator=own))
    return model.eval()


def save_adapter(model: peft.PeftModel, folder: Path, epsilon: float) -> Path:
    """An adapter member folder per the contract: peft's files + privacy.json + tokenizer."""
    model.save_pretrained(folder)
    tiny_tokenizer(folder).save_pretrained(folder)
    (folder / "privacy.json").write_text(json.dumps(PrivacyMetadata(epsilon, 1e-5, ("toy-train",)).to_dict()))
    return folder


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**example_inputs("bert")).logits


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = save_base(root / "base")
    return save_adapter(adapter_on(base, seed=1, noise=0.3), root / "eps1", 1.0)


@pytest.fixture(scope="module")
def stored(adapter_folder, tmp_path_factory):
    original = load_member_model(adapter_folder)
    family = FamilyStore.create(tmp_path_factory.mktemp("fam") / "family", block_size=BLOCK)
    family.add_model("eps1", original, files_from=adapter_folder, privacy=load_privacy(adapter_folder))
    return family, original


# --- loading adapter folders and round trips ---------------------------------------------------------
def test_load_member_model_loads_an_adapter_folder_as_peft_does(adapter_folder):
    model = load_member_model(adapter_folder)
    reference = peft.AutoPeftModelForSequenceClassification.from_pretrained(adapter_folder)
    assert isinstance(model, peft.PeftModelForSequenceClassification) and not model.training
    assert same_state(model, reference)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.state_dict().items())


def test_adapter_member_round_trips_bit_exactly_as_peft_model_and_merged(stored):
    family, original = stored
    folder = family.member_path("eps1")
    assert {"adapter_config.json", "config.json", "vocab.txt"} <= {f.name for f in folder.iterdir()}
    assert not (folder / "adapter_model.safetensors").exists()
    constitution = read_constitution(folder)
    data = constitution.to_dict()
    assert data["format"] == "hf_dpdedup/4"  # an adapter member whose rows hold runs
    assert data["name_prefix"] == "base_model.model." and not data["tensors"][0]["name"].startswith("base_model.")
    record = constitution.adapter
    assert (record.peft_type, record.task_type, record.peft_class, record.base_model_class) == (
        "LORA", "SEQ_CLS", "PeftModelForSequenceClassification", "BertForSequenceClassification")
    assert json.loads((folder / "adapter_config.json").read_text()) == record.config
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]

    loaded = DedupedModel.from_pretrained(folder)
    assert type(loaded) is type(original) and same_state(loaded, original)
    assert torch.equal(logits(loaded), logits(original))
    assert loaded.dedup_info.adapter["peft_type"] == "LORA" and not loaded.dedup_info.merged
    assert loaded.dedup_info.epsilon == 1.0

    merged = DedupedModel.from_pretrained(folder, merge_adapter=True)
    reference = copy.deepcopy(original).merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification" and merged.dedup_info.merged
    assert same_state(merged, reference)


def test_a_causal_lm_adapter_with_tied_embeddings_round_trips(tmp_path):
    base = tiny_model("gpt2", seed=0)
    base.save_pretrained(tmp_path / "base")
    import transformers

    model = get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.eval()
    family = FamilyStore.create(tmp_path / "family", block_size=BLOCK)
    family.add_model("gpt", model)
    loaded = DedupedModel.from_pretrained(family.member_path("gpt"))
    assert isinstance(loaded, peft.PeftModelForCausalLM) and same_state(loaded, model)
    inner = loaded.get_base_model()
    assert inner.lm_head.weight is inner.transformer.wte.weight  # tied again
    merged = DedupedModel.from_pretrained(family.member_path("gpt"), merge_adapter=True)
    assert same_state(merged, copy.deepcopy(model).merge_and_unload())


@pytest.mark.parametrize("autocast", [False, True])
def test_a_bfloat16_base_with_bfloat16_or_float32_adapters_round_trips(tmp_path, autocast):
    import transformers

    base = save_base(tmp_path / "base")
    model = get_peft_model(transformers.BertForSequenceClassification.from_pretrained(base, dtype=torch.bfloat16),
                           LoraConfig(**LORA), autocast_adapter_dtype=autocast).eval()
    lora = {v.dtype for k, v in model.state_dict().items() if "lora_" in k}
    assert lora == ({torch.float32} if autocast else {torch.bfloat16})
    # a family has one block dtype: float32 adapter tensors (smaller than a 1024 block) are stored as extras
    family = FamilyStore.create(tmp_path / "f", block_size=1024, dtype=torch.bfloat16)
    family.add_model("bf16", model)
    assert same_state(DedupedModel.from_pretrained(family.member_path("bf16")), model)


# --- a deduplicated family of adapters ---------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-family")
    base = save_base(root / "base")
    folders = [save_adapter(adapter_on(base, seed=i, noise=noise), root / f"eps{eps:g}", eps)
               for i, (eps, noise) in enumerate(((1.0, 0.6), (2.0, 0.25), (8.0, 0.0)))]
    members = [Member(f.name, load_member_model(f), load_privacy(f), files_from=f) for f in folders]
    teacher = members[-1].model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (600, 12), generator=g)
    with torch.no_grad():
        labels = teacher(input_ids=ids).logits.argmax(-1)
    batches = [{"input_ids": ids[i : i + 100], "labels": labels[i : i + 100]} for i in range(0, 600, 100)]
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    config = DedupConfig(block_size=BLOCK, threshold=0.03, strategy="binary")
    report = deduplicate_family(members, data, config, root / "store")
    return members, report, FamilyStore.open(root / "store"), base


def test_adapter_family_deduplicates_and_is_charged_as_full_models_are(adapter_run):
    members, report, family, _ = adapter_run
    by_name = {m.name: m for m in report.models}
    assert [m.role for m in report.models] == ["base", "target", "target"]
    assert sum(m.from_base + m.from_self for m in report.targets) > 0  # adapter blocks were shared
    # the same ledger as for full models (tests/test_dedup_engine.py): base, then the interactive chain
    assert by_name["eps1"].epsilon_after == 1.0
    assert by_name["eps2"].ledger.epsilon_loose == pytest.approx(3.0)
    assert by_name["eps8"].ledger.epsilon_loose == pytest.approx(11.0)
    # only the adapters differ, so the "differing tensors" figures are over adapter tensors
    for m in report.targets:
        assert m.differing_tensors and all("lora_" in n or "modules_to_save" in n for n in m.differing_tensors)
        assert 0 < m.original_bytes_differing < m.original_bytes / 10
    # what is stored is what was validated, bit for bit, as a PeftModel
    for member in members:
        loaded = DedupedModel.from_pretrained(family.member_path(member.name))
        assert isinstance(loaded, peft.PeftModel) and same_state(loaded, member.model)
        assert loaded.dedup_info.dedup.original_privacy.epsilon == member.privacy.epsilon


def test_the_base_rows_are_stored_once(adapter_run):
    members, _, family, _ = adapter_run
    layout = plan_layout(members[0].model.state_dict(), BLOCK)
    adapter_rows = sum(t.n_blocks for t in layout.tensors if "lora_" in t.name or "modules_to_save" in t.name)
    base_rows = layout.n_blocks - adapter_rows
    assert adapter_rows > 0 and base_rows > 10 * adapter_rows
    total = family.blocks.index.total_rows
    assert base_rows < total <= base_rows + 3 * adapter_rows  # one base + (at most) three adapters
    row_bytes = BLOCK * 4
    shard_bytes = sum(s.bytes for s in family.blocks.index.shards)
    assert shard_bytes <= (base_rows + 3 * adapter_rows) * row_bytes + 1024 * len(family.blocks.index.shards)
    assert family.blocks.stored_bytes() < 1.5 * base_rows * row_bytes  # three bases would be 3x


def test_a_merged_lora_member_deduplicates_like_any_other(adapter_run, tmp_path):
    members, _, _, _ = adapter_run
    merged = [Member(m.name, copy.deepcopy(m.model).merge_and_unload().eval(), m.privacy) for m in members]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (300, 12), generator=g)
    with torch.no_grad():
        labels = merged[-1].model(input_ids=ids).logits.argmax(-1)
    batches = [{"input_ids": ids[i : i + 100], "labels": labels[i : i + 100]} for i in range(0, 300, 100)]
    report = deduplicate_family(merged, DedupData(classification_score, public_val=batches),
                                DedupConfig(block_size=BLOCK, threshold=0.03, strategy="binary"), tmp_path / "s")
    assert [m.role for m in report.models] == ["base", "target", "target"]
    assert {m.name: m for m in report.models}["eps2"].ledger.epsilon_loose == pytest.approx(3.0)
    for m in merged:
        loaded = DedupedModel.from_pretrained(tmp_path / "s" / "members" / m.name)
        assert type(loaded).__name__ == "BertForSequenceClassification" and same_state(loaded, m.model)


# --- the Hub -----------------------------------------------------------------------------------------
def test_adapter_members_round_trip_through_the_hub_with_a_peft_card(hub, adapter_run, tmp_path):  # noqa: F811
    members, _, family, _ = adapter_run
    push_family_to_hub(family, "alice", family_name="lora", token="hf_write", endpoint=hub.url,
                       base_model="alice/tiny-bert")
    for member in members:
        repo = f"alice/lora-{member.name}"
        loaded = DedupedModel.from_pretrained(repo, endpoint=hub.url, cache_dir=tmp_path / "cache")
        assert isinstance(loaded, peft.PeftModel) and same_state(loaded, member.model)
        assert loaded.dedup_info.repo_id == repo and loaded.dedup_info.store_repo_id == "alice/lora-blocks"
        merged = DedupedModel.from_pretrained(repo, endpoint=hub.url, cache_dir=tmp_path / "cache",
                                              merge_adapter=True)
        assert same_state(merged, copy.deepcopy(member.model).merge_and_unload())
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(endpoint=hub.url, token="hf_read")
    files = set(api.list_repo_files("alice/lora-eps2"))
    assert {"config.json", "dedup_constitution.json", "modeling_hf_dpdedup.py"} <= files
    # no adapter_config.json / adapter_model.safetensors: transformers must not take it for a plain adapter
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}
    card = ModelCard(hub.blobs[hub.repos["alice/lora-eps2"].resolve("main").files["README.md"]].decode())
    meta = card.data.to_dict()
    assert (meta["library_name"], meta["base_model"], meta["base_model_relation"]) == (
        "peft", "alice/tiny-bert", "adapter")
    assert {"peft", "lora"} <= set(meta["tags"])
    assert card_metadata(card)["adapter"]["base_model_class"] == "BertForSequenceClassification"
    assert "merge_adapter=True" in card.text and "trust_remote_code=True" in card.text

    # plain transformers (remote code): merged with hf_dpdedup installed, a clear refusal without it
    got = as_a_transformers_user(hub, tmp_path, "alice/lora-eps2")
    assert got["class"] == "BertForSequenceClassification"
    reference = copy.deepcopy(members[1].model).merge_and_unload().state_dict()
    assert list(got["state_dict"]) == list(reference)
    assert all(torch.equal(got["state_dict"][k], v) for k, v in reference.items())
    with pytest.raises(AssertionError, match="peft adapter member"):
        as_a_transformers_user(hub, tmp_path / "bare", "alice/lora-eps2", "--without-hf-dpdedup")


def as_a_transformers_user(hub, tmp_path: Path, repo: str, *flags: str) -> dict:  # noqa: F811
    """AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True) in a fresh
    process whose HF_ENDPOINT is the local Hub (as tests/test_hub_transformers.py runs it)."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    out = tmp_path / "result.pt"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "user-cache"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_TOKEN": "hf_read", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys\n"
        "if '--without-hf-dpdedup' in sys.argv: sys.modules['hf_dpdedup'] = None\n"
        "import torch, transformers\n"
        "m = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "torch.save({'class': type(m).__name__, 'state_dict': m.state_dict()}, sys.argv[2])\n"
    )
    run = subprocess.run([sys.executable, "-c", code, repo, str(out), *flags], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.load(out, weights_only=False)


def test_pipeline_runs_an_adapter_member_merged(adapter_run):
    members, _, family, _ = adapter_run
    classify = pipeline("text-classification", family.member_path("eps8"), top_k=None, device=-1)
    assert type(classify.model).__name__ == "BertForSequenceClassification"
    assert len(classify("a good film")[0]) == 2


# --- typed refusals ----------------------------------------------------------------------------------
def test_the_serving_pool_refuses_adapter_members_naming_the_alternative(adapter_run):
    _, _, family, _ = adapter_run
    with pytest.raises(AdapterNotSupportedError, match="merge_adapter=True"):
        ServingPool(family.root)


def test_the_bare_remote_code_refuses_adapter_members_naming_the_alternative(stored):
    family, _ = stored
    spec = importlib.util.spec_from_file_location("modeling_hf_dpdedup_adapters_test", REMOTE_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(OSError, match="peft adapter member.*DedupedModel.from_pretrained"):
        module.load_member(str(family.member_path("eps1")))
    # with hf_dpdedup installed the auto-class target gives the merged transformers model
    merged = module.DedupedMember.from_pretrained(str(family.member_path("eps1")))
    assert type(merged).__name__ == "BertForSequenceClassification" and merged.dedup_info.merged


def test_a_peft_model_with_two_adapters_is_refused_before_anything_is_written(stored, tmp_path):
    _, original = stored
    model = copy.deepcopy(original)
    model.add_adapter("second", LoraConfig(**LORA))
    family = FamilyStore.create(tmp_path / "f", block_size=BLOCK)
    with pytest.raises(AdapterNotSupportedError, match="its own member"):
        family.add_model("two", model)
    assert family.members() == [] and family.blocks.index.total_rows == 0


def test_an_adapter_folder_whose_base_is_gone_is_a_typed_error(adapter_folder, tmp_path):
    import shutil

    folder = shutil.copytree(adapter_folder, tmp_path / "moved")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="base_model_name_or_path"):
        load_member_model(folder)
    config["task_type"] = "NO_SUCH_TASK"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="task_type"):
        load_member_model(folder)


def test_an_adapter_constitution_needs_its_format_and_record(stored):
    family, _ = stored
    data = read_constitution(family.member_path("eps1")).to_dict()
    from hf_dpdedup.store.constitution import Constitution

    with pytest.raises(ConstitutionError, match="adapter"):
        Constitution.from_dict({**data, "format": "hf_dpdedup/1"})
    with pytest.raises(ConstitutionError, match="adapter"):
        Constitution.from_dict({k: v for k, v in data.items() if k != "adapter"})


def test_the_dedup_command_takes_adapter_folders(tmp_path, capsys):
    from hf_dpdedup.cli import main

    from conftest import SST2_DIR

    base = save_base(tmp_path / "base")
    folders = [save_adapter(adapter_on(base, seed=i, noise=noise), tmp_path / f"lora-eps-{eps:g}", eps)
               for i, (eps, noise) in enumerate(((1.0, 0.3), (4.0, 0.0)))]
    lines = (SST2_DIR / "dev.tsv").read_text().splitlines()
    (tmp_path / "val.tsv").write_text("\n".join(lines[:101]) + "\n")
    out = tmp_path / "store"
    assert main(["dedup", *map(str, folders), "--out", str(out), "--val", str(tmp_path / "val.tsv"),
                 "--threshold", "0.05", "--block-size", str(BLOCK), "--strategy", "binary",
                 "--max-length", "32"]) == 0
    assert "lora-eps-4" in capsys.readouterr().out
    report = json.loads((out / "report" / "dedup_report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["base", "target"]
    loaded = DedupedModel.from_pretrained(out / "members" / "lora-eps-4")
    assert isinstance(loaded, peft.PeftModelForSequenceClassification) and loaded.dedup_info.epsilon == 5.0
    assert (out / "members" / "lora-eps-4" / "adapter_config.json").is_file()
    assert main(["inspect", str(out)]) == 0
    assert "BertForSequenceClassification+LORA" in capsys.readouterr().out


def test_fast_cls_head_validation_refuses_a_peft_model(stored):
    from hf_dpdedup.dedup.tasks import ClsHeadTask

    _, original = stored
    with pytest.raises(AdapterNotSupportedError, match="merge_and_unload"):
        ClsHeadTask(original, tokenizer=None)
    ClsHeadTask(copy.deepcopy(original).merge_and_unload(), tokenizer=None)  # the merged model is a plain BERT
