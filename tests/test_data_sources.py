"""Every form a data set can take (TSV, GLUE folder, csv, json, parquet, save_to_disk, Hub id) loads to the
same rows; bad splits and columns get typed errors naming what exists; batches built with ``Dataset.map``
are the batches the engine used before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers

import hf_dpdedup
from hf_dpdedup.data import DataSource, available_splits, load_source
from hf_dpdedup.dedup.tasks import encode_source, private_source, source_batches, text_batches, tsv_batches
from hf_dpdedup.errors import DataColumnError, DataSourceError, DataSplitError, TrainingConfigError
from hf_dpdedup.privacy import PrivateDataset
from hf_dpdedup.training import load_text_data, read_tsv

from conftest import SST2_DIR, minilm_path
from hub_support import hub  # noqa: F401  (fixture)

ROWS = [line.split("\t") for line in (SST2_DIR / "dev.tsv").read_text().splitlines()[1:41]]
TEXTS = tuple(r[1] for r in ROWS)
LABELS = tuple(int(r[0]) for r in ROWS)


def table(texts=TEXTS, labels=LABELS) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"sentence": list(texts), "label": list(labels)})


def write_tsv(path: Path, texts=TEXTS, labels=LABELS) -> Path:
    path.write_text("label\tsentence\n" + "".join(f"{y}\t{t}\n" for t, y in zip(texts, labels)))
    return path


def dataset_dict() -> datasets.DatasetDict:
    return datasets.DatasetDict({"train": table(TEXTS[:30], LABELS[:30]), "validation": table(TEXTS[30:], LABELS[30:])})


@pytest.fixture
def forms(tmp_path) -> dict[str, str]:
    """The 40 rows in every local form; value: what a data flag would say."""
    glue = tmp_path / "glue"
    glue.mkdir()
    write_tsv(glue / "dev.tsv")
    write_tsv(glue / "train.tsv", TEXTS[:3], LABELS[:3])
    table().to_csv(tmp_path / "d.csv", index=False)
    table().to_json(tmp_path / "d.jsonl")  # JSON lines
    (tmp_path / "d.json").write_text(json.dumps([{"sentence": t, "label": y} for t, y in zip(TEXTS, LABELS)]))
    table().to_parquet(tmp_path / "d.parquet")
    table().save_to_disk(tmp_path / "saved")
    (tmp_path / "csv-folder").mkdir()  # data files datasets recognises by name: train.csv, test.csv
    table(TEXTS[:3], LABELS[:3]).to_csv(tmp_path / "csv-folder" / "train.csv", index=False)
    table().to_csv(tmp_path / "csv-folder" / "test.csv", index=False)
    datasets.DatasetDict({"train": table(TEXTS[:3], LABELS[:3]), "test": table()}).save_to_disk(tmp_path / "saved-dict")
    return {
        "tsv": str(write_tsv(tmp_path / "d.tsv")), "glue": f"{glue}:dev", "csv": str(tmp_path / "d.csv"),
        "jsonl": str(tmp_path / "d.jsonl"), "json": str(tmp_path / "d.json"), "parquet": str(tmp_path / "d.parquet"),
        "save_to_disk": str(tmp_path / "saved"), "save_to_disk dict": f"{tmp_path / 'saved-dict'}:test",
        "csv folder": f"{tmp_path / 'csv-folder'}:test",
    }


@pytest.mark.parametrize("form", ["tsv", "glue", "csv", "jsonl", "json", "parquet", "save_to_disk", "save_to_disk dict",
                                  "csv folder"])
def test_every_local_form_reads_the_same_rows(forms, form):
    data = load_text_data(forms[form])
    assert data.texts == TEXTS and data.labels == LABELS  # quotes, commas and tabs-free SST-2 text survive


def test_read_tsv_is_the_tsv_case(forms):
    assert read_tsv(forms["tsv"]) == load_text_data(DataSource(forms["tsv"]))


def test_parse_splits_only_a_trailing_split(tmp_path):
    assert DataSource.parse("stanfordnlp/sst2:validation") == DataSource("stanfordnlp/sst2", split="validation")
    assert DataSource.parse("./my_ds:test", text_column="text").split == "test"
    odd = tmp_path / "a:b.tsv"  # an existing path is taken whole, colon and all
    write_tsv(odd)
    assert DataSource.parse(str(odd)) == DataSource(str(odd))
    assert DataSource.parse("data/dev.parquet").split is None


@pytest.mark.parametrize("spec, splits", [("glue:test", "['dev', 'train']"), ("glue", "['dev', 'train']"),
                                          ("saved-dict:validation", "['train', 'test']"),
                                          ("saved-dict", "['train', 'test']"),
                                          ("csv-folder:dev", "['train', 'test']")])
def test_a_bad_or_missing_split_names_the_available_ones(forms, tmp_path, spec, splits):
    with pytest.raises(DataSplitError, match=r"splits are " + splits.replace("[", r"\[").replace("]", r"\]")) as err:
        load_source(str(tmp_path / spec))
    assert ":SPLIT" in str(err.value)
    assert str(list(available_splits(DataSource.parse(str(tmp_path / spec))))) == splits
    assert isinstance(err.value, TrainingConfigError)  # the existing vocabulary still catches it


def test_a_split_of_a_single_file_or_dataset_is_refused(forms):
    with pytest.raises(DataSplitError, match="one data file"):
        load_source(forms["parquet"] + ":train")
    with pytest.raises(DataSplitError, match="one Dataset"):
        load_source(forms["save_to_disk"] + ":train")


def test_a_bad_column_names_the_columns_and_the_flag(forms):
    with pytest.raises(DataColumnError, match=r"columns \['sentence', 'label'\]; it has no 'text' column") as err:
        load_text_data(forms["parquet"], text_column="text")
    assert "--text-column" in str(err.value)
    with pytest.raises(DataColumnError, match="--label-column"):
        load_text_data(forms["csv"], label_column="y")


def test_missing_paths_and_unknown_suffixes(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_source(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataSourceError, match="does not exist"):
        load_source("./not-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="folder `datasets` finds no data in"):
        load_source(str(tmp_path / "empty"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataSourceError, match=r"must end in \.tsv"):
        load_source(str(tmp_path / "d.xlsx"))


def test_unknown_hub_id_offline_says_it_must_be_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(DataSourceError, match="HF_DATASETS_OFFLINE=1"):
        load_source("nobody/no-such-data-set:train")


def test_labels_class_label_names_and_integers():
    data = table(["a", "b", "c"], [0, 1, 1]).cast_column("label", datasets.ClassLabel(names=["neg", "pos"]))
    assert load_text_data_of(data).labels == (0, 1, 1)
    words = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    assert load_text_data_of(words, label_names=("neg", "pos")).labels == (1, 0, 1)
    assert load_text_data_of(words, label_names=("pos", "neg")).labels == (0, 1, 0)  # the given order, not sorted
    with pytest.raises(DataColumnError, match="label names in id order"):
        load_text_data_of(words)
    with pytest.raises(DataColumnError, match=r"known class names: \['neg'\]"):
        load_text_data_of(words, label_names=("neg",))
    digits_as_text = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": ["1", " 0"]})
    assert load_text_data_of(digits_as_text).labels == (1, 0)
    unlabelled = table(["a"], [0]).cast_column("label", datasets.ClassLabel(names=["neg", "pos"]))
    unlabelled = datasets.Dataset.from_dict({"sentence": ["a"], "label": [-1]}, features=unlabelled.features)
    with pytest.raises(DataColumnError, match="has no label"):  # a GLUE test split: -1 everywhere
        load_text_data_of(unlabelled)


def load_text_data_of(data: datasets.Dataset, **fields):
    from hf_dpdedup.training import from_dataset

    return from_dataset(data, source=DataSource("mem", **fields))


# --- batches through Dataset.map ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("form", ["tsv", "parquet", "save_to_disk dict"])
def test_batches_equal_the_tokenizer_loop(forms, tokenizer, form):
    expected = text_batches(tokenizer, list(TEXTS), list(LABELS), batch_size=16, max_length=24)
    assert_same_batches(source_batches(tokenizer, forms[form], "text-classification", batch_size=16, max_length=24),
                        expected)
    lm = source_batches(tokenizer, forms[form], "causal-lm", batch_size=16, max_length=24)
    assert_same_batches(lm, [{k: v for k, v in b.items() if k != "labels"} for b in expected])


def test_tsv_batches_are_source_batches(forms, tokenizer):
    assert_same_batches(tsv_batches(tokenizer, forms["tsv"], "text-classification", batch_size=8),
                        source_batches(tokenizer, forms["glue"], "text-classification", batch_size=8))


def test_map_is_cached_for_on_disk_data_sets(forms, tokenizer):
    folder = Path(forms["save_to_disk"])
    before = set(folder.glob("cache-*.arrow"))
    first = encode_source(tokenizer, DataSource(str(folder)), "text-classification", batch_size=16)
    made = set(folder.glob("cache-*.arrow")) - before
    assert made, "datasets writes the encoded table next to the saved one"
    again = encode_source(tokenizer, DataSource(str(folder)), "text-classification", batch_size=16)
    assert set(folder.glob("cache-*.arrow")) - before == made  # read back, not recomputed
    assert {f["filename"] for f in again.cache_files} == {f["filename"] for f in first.cache_files}


def test_private_source_goes_only_into_a_private_dataset(forms, tokenizer):
    private = private_source(tokenizer, forms["parquet"], "text-classification", dataset_id="reviews", public_size=50)
    assert isinstance(private, PrivateDataset) and private.public_size == 50 and private.dataset_id == "reviews"
    assert len(private) == len(TEXTS)
    with pytest.raises(hf_dpdedup.errors.PrivateDataAccessError):
        next(iter(private))


# --- Hub data sets (the project's local Hub, real datasets + huggingface_hub clients) ------------------
LOAD = """
import json, sys
from hf_dpdedup.data import DataSource, load_source
from hf_dpdedup.errors import DataSourceError, DataSplitError
spec, config = sys.argv[1], sys.argv[2] or None
try:
    data = load_source(DataSource.parse(spec, config_name=config)).to_dict()
except DataSourceError as exc:
    print(json.dumps({"error": type(exc).__name__ + ": " + str(exc)}))
    sys.exit(0)
try:
    load_source(DataSource.parse(spec.rsplit(":", 1)[0] + ":nope", config_name=config))
    bad = None
except DataSplitError as exc:
    bad = str(exc)
print(json.dumps({"rows": data, "bad": bad}))
"""


def client_env(hub, tmp_path) -> dict[str, str]:
    """A fresh process' environment: the local Hub as endpoint, caches under ``tmp_path``, online."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(PYTHONPATH=str(Path(hf_dpdedup.__file__).parents[1]), HF_ENDPOINT=hub.url, HF_TOKEN="hf_read",
               HF_HOME=str(tmp_path / "home"), HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
               HF_HUB_CACHE=str(tmp_path / "hub-cache"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0")
    return env


def run_load(spec: str, env: dict[str, str], config: str = "") -> dict:
    """``load_source`` in a fresh process (``datasets`` reads ``HF_ENDPOINT`` / offline mode at import)."""
    done = subprocess.run([sys.executable, "-c", LOAD, spec, config], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def publish(hub, repo_id: str, files: dict[str, datasets.Dataset | str], tmp_path: Path) -> None:
    """A data set repo on the local Hub, uploaded with the real huggingface_hub client."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="hf_write")
    api.create_repo(repo_id, repo_type="dataset")
    folder = tmp_path / "upload" / repo_id
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (folder / name).write_text(content)
        else:
            content.to_parquet(folder / name)
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="dataset")


def test_hub_id_loads_online_then_offline_from_the_cache(hub, tmp_path):
    publish(hub, "alice/tiny-reviews", {f"data/{split}-00000-of-00001.parquet": ds
                                         for split, ds in dataset_dict().items()}, tmp_path)
    assert "datasets/alice/tiny-reviews" in hub.repos and "alice/tiny-reviews" not in hub.repos  # not a model repo
    env = client_env(hub, tmp_path)
    online = run_load("alice/tiny-reviews:validation", env)
    assert online["rows"] == {"sentence": list(TEXTS[30:]), "label": list(LABELS[30:])}
    assert "splits are ['train', 'validation']" in online["bad"]
    assert any(p.startswith("/datasets/alice/tiny-reviews/resolve/") for _, p in hub.log)

    requests = len(hub.log)
    offline = run_load("alice/tiny-reviews:validation", {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert offline == online
    assert len(hub.log) == requests  # served from the datasets cache: not one request reached the Hub
    never = run_load("alice/never-loaded:train", {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert never["error"].startswith("DataSourceError") and "must already be in the datasets cache" in never["error"]


def test_hub_config_names_pick_a_config(hub, tmp_path):
    card = ("---\nconfigs:\n"
            "- config_name: short\n  data_files:\n  - split: train\n    path: short/train.parquet\n"
            "- config_name: long\n  data_files:\n  - split: train\n    path: long/train.parquet\n---\n")
    publish(hub, "alice/two-configs", {"README.md": card, "short/train.parquet": table(TEXTS[:5], LABELS[:5]),
                                       "long/train.parquet": table()}, tmp_path)
    env = client_env(hub, tmp_path)
    assert run_load("alice/two-configs:train", env, config="long")["rows"]["sentence"] == list(TEXTS)
    assert run_load("alice/two-configs:train", env, config="short")["rows"]["label"] == list(LABELS[:5])
    missing = run_load("alice/two-configs:train", env)["error"]
    assert "short" in missing and "long" in missing and "--dataset-config" in missing


def test_local_hub_dataset_and_model_repos_share_an_id(hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="hf_write")
    api.create_repo("alice/same", repo_type="dataset")
    api.create_repo("alice/same")
    api.upload_file(path_or_fileobj=b"data", path_in_repo="x.txt", repo_id="alice/same", repo_type="dataset")
    assert [f.rfilename for f in api.dataset_info("alice/same").siblings] == [".gitattributes", "x.txt"]
    assert [f.rfilename for f in api.model_info("alice/same").siblings] == [".gitattributes"]
    assert api.dataset_info("alice/same").id == "alice/same"
    with pytest.raises(Exception, match="already created this dataset repo"):
        api.create_repo("alice/same", repo_type="dataset")
    with pytest.raises(Exception):
        api.create_repo("alice/space", repo_type="space")


def test_image_batches_are_the_digits_recipe_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from hf_dpdedup.training import digits

    images, labels = digits.public_test_images()
    expected = digits.batches(digits.load_splits()["public_test"], batch_size=32)
    pictures = datasets.Dataset.from_dict({"image": [Image.fromarray(np.asarray(x)) for x in images],
                                           "label": labels.tolist()}).cast_column("image", datasets.Image())
    pictures.save_to_disk(tmp_path / "pictures")
    arrays = datasets.Dataset.from_dict({"pixels": images.tolist(), "label": labels.tolist()})  # no Image feature
    arrays.to_parquet(tmp_path / "arrays.parquet")
    processor = digits.processor()
    assert_same_batches(source_batches(processor, str(tmp_path / "pictures"), "image-classification", batch_size=32),
                        expected)
    got = source_batches(processor, DataSource(str(tmp_path / "arrays.parquet"), image_column="pixels"),
                         "image-classification", batch_size=32)
    assert_same_batches(got, expected)
    with pytest.raises(DataColumnError, match=r"no 'image' column.*--image-column"):
        source_batches(processor, str(tmp_path / "arrays.parquet"), "image-classification")
