"""Loading and splitting the data sets DP families are trained on.

Text classification data is any :class:`~hf_dpdedup.data.DataSource` with a label and a text column
(by default ``label`` and ``sentence``, the GLUE layout; :func:`read_tsv` is the TSV case).
Splits are deterministic given a seed so that the private validation part can be rebuilt later by
the dedup engine (it must stay disjoint from the training part).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ..data.sources import DataSource, label_ids, load_source, require_columns
from ..errors import TrainingConfigError


@dataclass(frozen=True)
class TextClassificationData:
    """Sentences with integer labels ``0 .. num_labels-1``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise TrainingConfigError(
                f"{len(self.texts)} texts but {len(self.labels)} labels; give one label per text."
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return max(self.labels) + 1 if self.labels else 0

    def subset(self, indices: list[int] | np.ndarray) -> "TextClassificationData":
        return TextClassificationData(
            tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices)
        )


def read_tsv(path: str | Path, *, text_column: str = "sentence", label_column: str = "label") -> TextClassificationData:
    """Read a labelled TSV file (one case of :func:`load_text_data`); raise :class:`TrainingConfigError` if it
    is missing, empty or unlabelled."""
    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"Data file {path} does not exist; pass a TSV file with a header line.")
    return load_text_data(DataSource(str(path), text_column=text_column, label_column=label_column))


def load_text_data(source: DataSource | str | Path, **fields) -> TextClassificationData:
    """Sentences and class ids from any :class:`~hf_dpdedup.data.DataSource` (a Hub id, a ``save_to_disk``
    folder, a csv/tsv/json/parquet file, a GLUE folder split); a string is ``PATH_OR_ID[:SPLIT]``."""
    if not isinstance(source, DataSource):
        source = DataSource.parse(source, **fields)
    return from_dataset(load_source(source), source=source)


def from_dataset(data: datasets.Dataset, *, text_column: str = "sentence", label_column: str = "label",
                 source: DataSource | str = "the data set") -> TextClassificationData:
    """Sentences and integer labels from a ``datasets.Dataset``'s two columns (labels: :func:`label_ids`)."""
    if not isinstance(source, DataSource):
        source = DataSource(str(source), text_column=text_column, label_column=label_column)
    require_columns(data, source, "label", "text")
    if len(data) == 0:
        raise TrainingConfigError(f"{source.describe()} holds no examples; DP training needs a non-empty data set.")
    labels = label_ids(data, source)
    texts = tuple("" if t is None else str(t) for t in data[source.text_column])
    return TextClassificationData(texts, tuple(labels))


def split_indices(n: int, *, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, validation) index arrays of ``range(n)``, deterministic given ``seed``."""
    if not 0 <= validation_fraction < 1:
        raise TrainingConfigError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_private(
    data: TextClassificationData, *, validation_fraction: float, seed: int
) -> tuple[TextClassificationData, TextClassificationData]:
    """Split a private data set into a training part and a disjoint private validation part."""
    train_idx, val_idx = split_indices(len(data), validation_fraction=validation_fraction, seed=seed)
    return data.subset(train_idx), data.subset(val_idx)


def tokenize(tokenizer, texts: tuple[str, ...] | list[str], *, max_length: int) -> dict[str, torch.Tensor]:
    """Pad/truncate to exactly ``max_length`` tokens so that cached activations stack."""
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}


def load_digits_halves(*, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8×8 digits, split 50/50 into a public and a private half (images in [0, 1])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    public_idx, private_idx = split_indices(len(labels), validation_fraction=0.5, seed=seed)
    return (images[public_idx], labels[public_idx]), (images[private_idx], labels[private_idx])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (init, dropout and Opacus' Poisson sampling use torch's RNG)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
