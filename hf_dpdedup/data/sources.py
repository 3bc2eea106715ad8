"""Where data enters: one :class:`DataSource` for every form a data set can take, loaded through 🤗 ``datasets``.

A source is one of

* a **Hub data set id** (``stanfordnlp/sst2``) with a split and optionally a config name, loaded with
  ``datasets.load_dataset`` (with ``HF_DATASETS_OFFLINE=1`` from the ``datasets`` cache, no network);
* a **``save_to_disk`` folder** (``datasets.load_from_disk``): a ``Dataset``, or a ``DatasetDict``
  whose split must be named;
* a **data file**: ``.tsv`` (GLUE layout: tab-separated, a header line, no quoting), ``.csv``,
  ``.json`` / ``.jsonl`` or ``.parquet``, read with ``load_dataset(<builder>, data_files=...)``;
* a **GLUE folder** of ``<split>.tsv`` files (``train.tsv``, ``dev.tsv``, ``test.tsv``): the split
  names the file.

On the command line a source is written ``PATH_OR_ID[:SPLIT]`` (:meth:`DataSource.parse`), e.g.
``stanfordnlp/sst2:validation``, ``./my_ds:test``, ``data/dev.parquet``.

Labels (:func:`label_ids`) are integers ``0 .. k-1``: an integer column, a ``ClassLabel`` column (its
ids), or strings. Strings that spell non-negative integers are those integers; other strings are
class names, mapped to their index in ``DataSource.label_names`` (for ``hf-dpdedup dedup`` by default
the members' own ``id2label``, so ids mean what the model's head means). Class names without label
names are refused: an order guessed from the data (sorted, first seen) would silently disagree with
the model's head.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import DataColumnError, DataSourceError, DataSplitError

#: data file suffix → (``datasets`` builder, its keyword arguments)
FILE_BUILDERS: dict[str, tuple[str, dict]] = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".csv": ("csv", {"keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_SPLIT = re.compile(r"^[A-Za-z0-9_.\-]+$")  # a split name, as datasets allows them


@dataclass(frozen=True)
class DataSource:
    """A data set and how to read it: ``path`` (a file, a folder or a Hub id), the ``split`` (needed for
    a folder of splits, a ``DatasetDict`` or a Hub data set with more than one split), the Hub
    ``config_name`` and ``revision``, and the columns to read."""

    path: str
    split: str | None = None
    config_name: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    image_column: str | None = None
    revision: str | None = None
    label_names: tuple[str, ...] | None = None  # class names in id order, for string labels

    @classmethod
    def parse(cls, spec: str | Path, **fields) -> "DataSource":
        """``PATH_OR_ID[:SPLIT]``: a path that exists is taken whole (its name may hold a ``:``);
        otherwise a ``:SPLIT`` suffix names the split."""
        spec = str(spec)
        head, sep, tail = spec.rpartition(":")
        if sep and head and _SPLIT.match(tail) and not Path(spec).exists():
            return cls(head, split=tail, **fields)
        return cls(spec, **fields)

    def with_split(self, split: str | None) -> "DataSource":
        return dataclasses.replace(self, split=split)

    @property
    def kind(self) -> str:
        """``"file"``, ``"glue"`` (folder of ``<split>.tsv``), ``"disk"`` (``save_to_disk``), ``"folder"``
        (data files ``datasets`` recognises) or ``"hub"``."""
        path = Path(self.path)
        if path.is_file():
            return "file"
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return "disk"
            if any(path.glob("*.tsv")):
                return "glue"
            return "folder"
        return "hub"

    def describe(self) -> str:
        """A readable name: the file itself for a file or a GLUE split, else ``path[:split]`` (+ config)."""
        kind = self.kind
        if kind == "glue" and self.split is not None:
            return str(Path(self.path) / f"{self.split}.tsv")
        if kind == "file":
            return str(Path(self.path))
        name = self.path if self.split is None else f"{self.path}:{self.split}"
        return name if self.config_name is None else f"{name} (config {self.config_name})"


def available_splits(source: DataSource) -> tuple[str, ...]:
    """The splits a source offers; ``()`` for a single file or a ``save_to_disk`` ``Dataset``.
    (A Hub data set is loaded to list them.)"""
    kind = source.kind
    if kind == "file":
        return ()
    if kind == "glue":
        return tuple(sorted(p.stem for p in Path(source.path).glob("*.tsv")))
    if kind == "disk":
        meta = Path(source.path) / "dataset_dict.json"
        return tuple(json.loads(meta.read_text())["splits"]) if meta.is_file() else ()
    return tuple(_load_dict(source).keys())


def load_source(source: DataSource | str | Path, **fields) -> datasets.Dataset:
    """The split ``source`` names, as a ``datasets.Dataset``. A string is parsed with
    :meth:`DataSource.parse` (``fields`` go to the data class). Raises :class:`DataSplitError` naming the
    available splits, :class:`DataSourceError` for anything unreadable."""
    if not isinstance(source, DataSource):
        source = DataSource.parse(source, **fields)
    kind = source.kind
    if kind == "file":
        if source.split is not None:
            raise DataSplitError(f"{source.path} is one data file, it has no split {source.split!r}; "
                                 "pass the file without ':SPLIT'.")
        return _read_file(Path(source.path))
    if kind == "glue":
        splits = available_splits(source)
        if source.split not in splits:
            raise DataSplitError(_split_message(source, splits))
        return _read_file(Path(source.path) / f"{source.split}.tsv")
    if kind == "disk":
        try:
            loaded = datasets.load_from_disk(source.path)
        except (FileNotFoundError, ValueError) as exc:
            raise DataSourceError(f"{source.path} is not a readable save_to_disk folder: {exc}") from None
        if isinstance(loaded, datasets.Dataset):
            if source.split is not None:
                raise DataSplitError(f"{source.path} holds one Dataset (saved with save_to_disk), it has no split "
                                     f"{source.split!r}; pass the folder without ':SPLIT'.")
            return loaded
        return _pick(source, loaded)
    return _pick(source, _load_dict(source))


def _read_file(path: Path) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataSourceError(f"{path}: data files must end in {', '.join(FILE_BUILDERS)}; "
                              "convert it, or pass a save_to_disk folder or a Hub data set id.")
    name, kwargs = builder
    try:
        return datasets.load_dataset(name, data_files={"data": str(path)}, split="data", **kwargs)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        if "corresponds to no data" in str(exc):  # a header line and nothing else
            raise DataSourceError(f"{path} holds no examples; pass a non-empty data set.") from None
        raise DataSourceError(f"{path} is not a readable {path.suffix[1:]} file"
                              f"{' with a header line' if name == 'csv' else ''}: {exc}") from None


def _load_dict(source: DataSource) -> datasets.DatasetDict:
    """Every split of a Hub data set (or a folder of data files ``datasets`` recognises)."""
    if source.kind == "hub" and (source.path.startswith((".", "/", "~"))
                                 or Path(source.path).suffix.lower() in FILE_BUILDERS):
        raise DataSourceError(f"{source.path} does not exist; pass an existing file or folder, or a Hub data set "
                              "id such as stanfordnlp/sst2.")
    try:
        loaded = datasets.load_dataset(source.path, source.config_name, revision=source.revision)
    except ValueError as exc:  # e.g. "Config name is missing ... available configs: [...]"
        hint = " Pass the config with --dataset-config NAME." if "onfig" in str(exc) else ""
        raise DataSourceError(f"{source.describe()}: {exc}{hint}") from None
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        if source.kind == "folder":
            raise DataSourceError(
                f"{source.path} is a folder `datasets` finds no data in ({type(exc).__name__}: {exc}). Pass a "
                "save_to_disk folder, a GLUE folder of <split>.tsv files, or a folder of csv/json/parquet files."
            ) from None
        raise DataSourceError(
            f"{source.path} is neither a local file or folder nor a data set `datasets` can load from the Hub "
            f"({type(exc).__name__}: {exc}). Pass an existing path, or a Hub id; with HF_DATASETS_OFFLINE=1 "
            "the data set must already be in the datasets cache (load it once online)."
        ) from None
    return loaded  # without split=, load_dataset returns every split


def _pick(source: DataSource, splits: datasets.DatasetDict) -> datasets.Dataset:
    if source.split is None and len(splits) == 1:
        return next(iter(splits.values()))
    if source.split not in splits:
        raise DataSplitError(_split_message(source, tuple(splits)))
    return splits[source.split]


def _split_message(source: DataSource, splits: tuple[str, ...]) -> str:
    what = "no split given" if source.split is None else f"no split {source.split!r}"
    return (f"{source.path}: {what}; its splits are {list(splits)}. Pass one as {source.path}:SPLIT "
            f"(e.g. {source.path}:{splits[0] if splits else 'train'}).")


def require_columns(data: datasets.Dataset, source: DataSource, *roles: str) -> None:
    """Raise :class:`DataColumnError` naming ``data``'s columns if the column of a role (``"text"``,
    ``"label"``, ``"image"``) is missing; the message names the flag that picks another column."""
    wanted = {role: getattr(source, f"{role}_column") for role in roles}
    missing = {role: col for role, col in wanted.items() if col not in data.column_names}
    if missing:
        names = " or ".join(repr(c) for c in missing.values())
        flags = ", ".join(f"--{role}-column NAME ({role}_column=)" for role in missing)
        raise DataColumnError(
            f"{source.describe()} has columns {list(data.column_names)}; it has no {names} column. Name the "
            f"column to read with {flags}."
            + (" Unlabelled data cannot be used for supervised DP fine-tuning or for accuracy."
               if "label" in missing else "")
        )


def label_ids(data: datasets.Dataset, source: DataSource) -> list[int]:
    """The label column as integer class ids (rule: module docstring)."""
    column = source.label_column
    feature = data.features[column]
    if isinstance(feature, datasets.ClassLabel):
        ids = list(data[column])
        if any(i is None or i < 0 for i in ids):  # e.g. the -1 of an unlabelled GLUE test split
            row = next(n for n, i in enumerate(ids) if i is None or i < 0)
            raise DataColumnError(f"{source.describe()}: row {row} has no label ({ids[row]!r}); use a labelled split.")
        return ids
    names = {name: i for i, name in enumerate(source.label_names or ())}
    labels = []
    for row, raw in enumerate(data[column]):
        text = "" if raw is None else str(raw).strip()
        if text.lstrip("-").isdigit() and int(text) >= 0 and not isinstance(raw, float):
            labels.append(int(text))
        elif isinstance(raw, str) and text in names:
            labels.append(names[text])
        else:
            hint = (f"known class names: {list(names)}" if names else
                    "class names need label names in id order (--label-names, or a ClassLabel column)")
            raise DataColumnError(f"{source.describe()}, row {row}: label {raw!r} is not a non-negative integer; "
                                  f"every row needs a label ({hint}).")
    return labels
