"""Data sets shipped with the package, loaded through 🤗 ``datasets`` like any other data.

``sst2``: the GLUE SST-2 sentences (``train``/``dev``/``test`` TSV files, see ``sst2/README.md``).
The same loader takes a user's files, ``save_to_disk`` folders or Hub data sets
(:mod:`.sources`: :class:`DataSource`, :func:`load_source`; ``hf_dpdedup.training.load_text_data``);
the built-in ones only spare a download, so the demo and the tests run offline on a fresh machine.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import TrainingConfigError
from .sources import DataSource, available_splits, label_ids, load_source, require_columns

__all__ = ["BUILTIN", "DataSource", "available_splits", "builtin_path", "label_ids", "load_builtin", "load_source",
           "require_columns"]

_HERE = Path(__file__).resolve().parent
BUILTIN: dict[str, tuple[str, ...]] = {"sst2": ("train", "dev", "test")}


def builtin_path(name: str, split: str) -> Path:
    """The file of a built-in data set's split (works from a checkout and from an installed wheel)."""
    if name not in BUILTIN or split not in BUILTIN[name]:
        raise TrainingConfigError(
            f"No built-in data set {name!r} with split {split!r}; built-in: "
            + ", ".join(f"{n} ({'/'.join(s)})" for n, s in BUILTIN.items())
        )
    return _HERE / name / f"{split}.tsv"


def load_builtin(name: str, split: str) -> datasets.Dataset:
    """A built-in split as a ``datasets.Dataset`` (columns ``label`` and ``sentence`` for SST-2)."""
    builtin_path(name, split)  # a typed error for an unknown name or split
    return load_source(DataSource(str(_HERE / name), split=split))
