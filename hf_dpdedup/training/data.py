"""Loading and splitting the data sets DP families are trained on.

Text classification data is a TSV file with a header line naming a ``label`` and a ``sentence``
column (the GLUE layout). Splits are deterministic given a seed so that the private validation
part can be rebuilt later by the dedup engine (it must stay disjoint from the training part).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

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
    """Read a labelled TSV file (through ``datasets``); raise :class:`TrainingConfigError` if it is
    missing, empty or unlabelled."""
    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"Data file {path} does not exist; pass a TSV file with a header line.")
    try:
        data = datasets.load_dataset("csv", data_files={"data": str(path)}, delimiter="\t",
                                     quoting=csv.QUOTE_NONE, split="data", keep_default_na=False)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        if "corresponds to no data" in str(exc):  # a header line and nothing else
            raise TrainingConfigError(f"{path} holds no examples; DP training needs a non-empty data set.") from None
        raise TrainingConfigError(f"{path} is not a readable TSV file with a header line: {exc}") from None
    return from_dataset(data, text_column=text_column, label_column=label_column, source=str(path))


def from_dataset(data: datasets.Dataset, *, text_column: str = "sentence", label_column: str = "label",
                 source: str = "the data set") -> TextClassificationData:
    """Sentences and integer labels from a ``datasets.Dataset``'s two columns."""
    header = list(data.column_names)
    if text_column not in header or label_column not in header:
        raise TrainingConfigError(
            f"{source} has columns {header}; it needs a {label_column!r} and a {text_column!r} column "
            "(unlabelled data cannot be used for supervised DP fine-tuning)."
        )
    if len(data) == 0:
        raise TrainingConfigError(f"{source} holds no examples; DP training needs a non-empty data set.")
    labels = []
    for row_no, raw in enumerate(data[label_column], start=2):
        text = str(raw).strip()
        if not text.lstrip("-").isdigit() or int(text) < 0:
            raise TrainingConfigError(
                f"{source}:{row_no}: label {raw!r} is not a non-negative integer; every row needs a label."
            )
        labels.append(int(text))
    texts = tuple("" if t is None else str(t) for t in data[text_column])
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
