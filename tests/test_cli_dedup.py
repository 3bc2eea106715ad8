"""``hf-dpdedup dedup`` end to end on tiny member folders with real SST-2 sentences."""

from __future__ import annotations

import json

import torch
import transformers

from hf_dpdedup import DedupedModel
from hf_dpdedup.cli import main
from hf_dpdedup.dedup.config import DedupConfig
from hf_dpdedup.privacy import PrivacyMetadata

from conftest import SST2_DIR, minilm_path


def write_members(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    cfg = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    folders = []
    for eps, noise in ((1.0, 0.3), (4.0, 0.0)):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
        folder = tmp_path / f"eps-{eps:g}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "privacy.json").write_text(json.dumps(PrivacyMetadata(eps, 1e-5, ("sst2-train",)).to_dict()))
        folders.append(folder)
    lines = (SST2_DIR / "dev.tsv").read_text().splitlines()
    (tmp_path / "val.tsv").write_text("\n".join(lines[:121]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join([lines[0]] + lines[121:241]) + "\n")
    return folders


def test_dedup_command_writes_a_store_and_a_report(tmp_path, capsys):
    folders = write_members(tmp_path)
    out = tmp_path / "store"
    code = main(["dedup", *map(str, folders), "--out", str(out), "--val", str(tmp_path / "val.tsv"),
                 "--test", str(tmp_path / "test.tsv"), "--threshold", "0.05", "--block-size", "4096",
                 "--strategy", "halving"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eps-4" in printed and "fairness holds" in printed
    report = json.loads((out / "report" / "dedup_report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["base", "target"]
    assert (out / "report" / "dedup_report.png").is_file()
    loaded = DedupedModel.from_pretrained(out / "members" / "eps-4")
    assert (out / "members" / "eps-4" / "tokenizer.json").is_file()
    assert loaded.dedup_info.epsilon == 5.0  # 4 + the base's 1


def test_aligned_only_dedup_streams_members_and_records_it(tmp_path, capsys):
    folders = write_members(tmp_path)
    out = tmp_path / "store"
    code = main(["dedup", *map(str, folders), "--out", str(out), "--val", str(tmp_path / "val.tsv"),
                 "--threshold", "0.05", "--block-size", "4096", "--aligned-only", "--cost", "wanda"])
    assert code == 0
    report = json.loads((out / "report" / "dedup_report.json").read_text())
    assert report["config"]["plan"]["use_self"] is False and report["config"]["plan"]["cost"] == "wanda"
    assert DedupConfig.from_family(out) == DedupConfig.from_dict(report["config"])  # dedup_config.json
    target = report["models"][1]
    assert target["from_self"] == 0 and target["from_base"] > 0
    reference = transformers.BertForSequenceClassification.from_pretrained(folders[0])
    loaded = DedupedModel.from_pretrained(out / "members" / "eps-1")  # the base is stored as it was
    for k, v in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_dedup_command_needs_privacy_metadata(tmp_path, capsys):
    folders = write_members(tmp_path)
    (folders[1] / "privacy.json").unlink()
    code = main(["dedup", *map(str, folders), "--out", str(tmp_path / "s"), "--val", str(tmp_path / "val.tsv")])
    assert code == 2
    assert "privacy.json" in capsys.readouterr().err


# --- every data form through the CLI, image classification -------------------------------------------
def test_dedup_reads_parquet_save_to_disk_and_csv_sources(tmp_path, capsys):
    import datasets

    folders = write_members(tmp_path)
    val = datasets.load_dataset("csv", data_files=str(tmp_path / "val.tsv"), delimiter="\t", split="train")
    test = datasets.load_dataset("csv", data_files=str(tmp_path / "test.tsv"), delimiter="\t", split="train")
    val.rename_column("sentence", "text").to_parquet(tmp_path / "val.parquet")
    datasets.DatasetDict({"validation": val.rename_column("sentence", "text"),
                          "test": test.rename_column("sentence", "text")}).save_to_disk(tmp_path / "dd")
    val.rename_column("sentence", "text").to_csv(tmp_path / "private.csv", index=False)
    out = tmp_path / "store"
    code = main(["dedup", *map(str, folders), "--out", str(out), "--val", str(tmp_path / "val.parquet"),
                 "--confirm", f"{tmp_path / 'dd'}:validation", "--test", f"{tmp_path / 'dd'}:test",
                 "--private-val", str(tmp_path / "private.csv"), "--private-size", "120", "--validation", "svt",
                 "--text-column", "text", "--threshold", "0.05", "--block-size", "4096", "--strategy", "halving"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report" / "dedup_report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["base", "target"]
    assert DedupedModel.from_pretrained(out / "members" / "eps-4") is not None


def test_dedup_names_the_columns_when_one_is_missing(tmp_path, capsys):
    folders = write_members(tmp_path)
    code = main(["dedup", *map(str, folders), "--out", str(tmp_path / "s"), "--val", str(tmp_path / "val.tsv"),
                 "--text-column", "review"])
    assert code == 2
    err = capsys.readouterr().err
    assert "DataColumnError" in err and "['label', 'sentence']" in err and "--text-column" in err
    assert not (tmp_path / "s").exists()


def test_dedup_image_classification_on_a_tiny_vit_family(tmp_path, capsys):
    import datasets
    import numpy as np
    from PIL import Image

    from hf_dpdedup.training import digits

    images, labels = digits.public_test_images()
    cfg = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=10,
                                 id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    folders = []
    for eps, noise in ((1.0, 0.3), (4.0, 0.0)):
        torch.manual_seed(0)
        model = transformers.ViTForImageClassification(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
        folder = tmp_path / f"vit-eps-{eps:g}"
        model.save_pretrained(folder)
        digits.processor().save_pretrained(folder)
        (folder / "privacy.json").write_text(json.dumps(PrivacyMetadata(eps, 1e-5, ("digits-private",)).to_dict()))
        folders.append(folder)
    pictures = datasets.Dataset.from_dict(
        {"picture": [Image.fromarray(np.asarray(x)) for x in images], "digit": [str(int(y)) for y in labels]}
    ).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"validation": pictures.select(range(120)),
                          "test": pictures.select(range(120, len(pictures)))}).save_to_disk(tmp_path / "digits")
    out = tmp_path / "vit-store"
    code = main(["dedup", *map(str, folders), "--task", "image-classification", "--out", str(out),
                 "--val", f"{tmp_path / 'digits'}:validation", "--test", f"{tmp_path / 'digits'}:test",
                 "--image-column", "picture", "--label-column", "digit",  # names "0".."9": the members' id2label
                 "--threshold", "0.5", "--block-size", "128", "--strategy", "halving"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report" / "dedup_report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["base", "target"]
    target = report["models"][1]
    assert target["from_base"] + target["from_self"] > 0  # blocks were deduplicated on the image scores
    loaded = DedupedModel.from_pretrained(out / "members" / "vit-eps-4")
    assert loaded.config.model_type == "vit"


def test_without_confirm_half_of_val_is_held_out_to_confirm_on(tmp_path, capsys):
    """A user with one validation set still gets a confirmation the search never saw; --hold-out 0 is
    the unconfirmed search on all of it, and --hold-out beside --confirm is refused."""
    folders = write_members(tmp_path)
    flags = ["--val", str(tmp_path / "val.tsv"), "--threshold", "0.05", "--block-size", "4096"]
    assert main(["dedup", *map(str, folders), "--out", str(tmp_path / "held"), *flags]) == 0
    assert "50% of --val held out (seed 0): 60 examples searched, 60 confirming" in capsys.readouterr().err
    report = json.loads((tmp_path / "held" / "report" / "dedup_report.json").read_text())
    held = report["models"][1]
    assert held["confirmations"] >= 1
    assert report["data"]["public_splits"] == {  # the report says what each step validated on
        "search": str(tmp_path / "val.tsv"), "confirm": f"held out of {tmp_path / 'val.tsv'}", "hold_out": 0.5,
        "hold_out_seed": 0, "search_examples": 60, "confirm_examples": 60}
    assert main(["dedup", *map(str, folders), "--out", str(tmp_path / "all"), *flags, "--hold-out", "0"]) == 0
    assert "held out" not in capsys.readouterr().err
    report = json.loads((tmp_path / "all" / "report" / "dedup_report.json").read_text())
    assert report["models"][1]["confirmations"] == 0
    assert report["data"]["public_splits"]["confirm"] is None
    code = main(["dedup", *map(str, folders), "--out", str(tmp_path / "both"), *flags, "--hold-out", "0.3",
                 "--confirm", str(tmp_path / "test.tsv")])
    assert code == 2 and "--hold-out" in capsys.readouterr().err and not (tmp_path / "both").exists()
