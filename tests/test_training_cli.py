"""``hf-dpdedup train-family``: the summary table, the saved members, clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from hf_dpdedup.cli import train_family as cli
from hf_dpdedup.errors import DataSplitError, TrainingConfigError

from test_training_family import make_base, make_data


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train-family", *argv])


def _write_tsv(path, data):
    rows = "".join(f"{y}\t{t}\n" for t, y in zip(data.texts, data.labels))
    path.write_text("label\tsentence\n" + rows)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name, n, seed in (("train", 120, 0), ("dev", 24, 1), ("test", 24, 2)):
        _write_tsv(d / f"{name}.tsv", make_data(n, seed))
    return d


def test_registered_in_the_command_list():
    from hf_dpdedup.cli import COMMANDS, build_parser

    assert COMMANDS["train-family"][0] == "train_family"
    # listed without importing it, parsed once it is the command
    assert "train-family" in build_parser([]).format_help()
    args = build_parser(["train-family", "--base", "b", "--data", "d", "--epsilons", "1", "--delta", "1e-5",
                         "--out", "o"]).parse_args(["train-family", "--base", "b", "--data", "d", "--epsilons", "1",
                                                    "--delta", "1e-5", "--out", "o"])
    assert args.epsilons == [1.0] and callable(args.func)


def test_trains_a_family_and_prints_the_table(tmp_path, data_dir, capsys):
    base = make_base(tmp_path / "base")
    args = _parse(["--base", str(base), "--data", str(data_dir), "--epsilons", "2", "8", "--delta", "1e-5",
                   "--out", str(tmp_path / "fam"), "--epochs", "1", "--batch-size", "32", "--lr", "0.5",
                   "--max-length", "8", "--optimizer", "lars", "--no-progress"])
    assert args.func(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["ε", "δ", "steps", "σ", "val", "acc"]
    assert [line.split()[0] for line in table[2:]] == ["2", "8"]
    assert (tmp_path / "fam" / "eps-8" / "privacy.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [(["--epsilons", "0", "--delta", "1e-5"], "epsilon"), (["--epsilons", "1", "--delta", "1"], "delta")],
)
def test_bad_budgets_are_reported(tmp_path, data_dir, extra, message):
    args = _parse(["--base", "unused", "--data", str(data_dir), "--out", str(tmp_path / "o"), *extra])
    with pytest.raises(TrainingConfigError, match=message):
        args.func(args)
    assert not (tmp_path / "o").exists()


def test_unlabelled_data_is_reported(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\na film\n")
    args = _parse(["--base", "unused", "--data", str(tmp_path / "train.tsv"), "--public-test",
                   str(tmp_path / "train.tsv"), "--epsilons", "1", "--delta", "1e-5", "--out", str(tmp_path / "o")])
    with pytest.raises(TrainingConfigError, match="label"):
        args.func(args)


def test_a_data_file_needs_a_public_test_file(tmp_path, data_dir):
    args = _parse(["--base", "unused", "--data", str(data_dir / "train.tsv"), "--epsilons", "1",
                   "--delta", "1e-5", "--out", str(tmp_path / "o")])
    with pytest.raises(TrainingConfigError, match="--public-test"):
        args.func(args)


def test_trains_from_a_save_to_disk_dataset_dict_and_its_splits(tmp_path, capsys):
    import datasets

    def table(n, seed):
        data = make_data(n, seed)
        return datasets.Dataset.from_dict({"text": list(data.texts), "y": list(data.labels)})

    datasets.DatasetDict({"train": table(120, 0), "validation": table(24, 1), "test": table(24, 2)}).save_to_disk(
        tmp_path / "dd")
    base = make_base(tmp_path / "base")
    args = _parse(["--base", str(base), "--data", str(tmp_path / "dd"), "--text-column", "text", "--label-column",
                   "y", "--epsilons", "8", "--delta", "1e-5", "--out", str(tmp_path / "fam"), "--epochs", "1",
                   "--batch-size", "32", "--max-length", "8", "--no-progress"])
    assert args.func(args) == 0
    privacy = json.loads((tmp_path / "fam" / "eps-8" / "privacy.json").read_text())
    assert privacy["datasets"][0].startswith(f"{tmp_path / 'dd'}:train#train(")
    bad = _parse(["--base", "unused", "--data", f"{tmp_path / 'dd'}:train", "--public-test", f"{tmp_path / 'dd'}:dev",
                  "--text-column", "text", "--label-column", "y", "--epsilons", "1", "--delta", "1e-5",
                  "--out", str(tmp_path / "o")])
    with pytest.raises(DataSplitError, match=r"splits are \['train', 'validation', 'test'\]"):
        bad.func(bad)
