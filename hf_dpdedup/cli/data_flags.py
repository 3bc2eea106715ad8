"""The data flags ``train-family`` and ``dedup`` share: how a data flag's value names a data set.

Every data flag takes ``PATH_OR_ID[:SPLIT]`` (:class:`hf_dpdedup.data.DataSource`): a Hub data set id
(``stanfordnlp/sst2:validation``; offline from the ``datasets`` cache with ``HF_DATASETS_OFFLINE=1``), a
``save_to_disk`` folder (``./my_ds:test`` for a DatasetDict), a ``.tsv``/``.csv``/``.json``/``.jsonl``/
``.parquet`` file, or a GLUE folder of ``<split>.tsv`` files (``data/sst2:dev``). The column and config
flags apply to every data flag of the command.
"""

from __future__ import annotations

import argparse

from ..data import DataSource

SOURCE_HELP = ("PATH_OR_ID[:SPLIT]: a Hub data set id (e.g. stanfordnlp/sst2:validation), a save_to_disk folder "
               "(:SPLIT for a DatasetDict), a .tsv/.csv/.json/.jsonl/.parquet file, or a GLUE folder of <split>.tsv")


def add_data_flags(parser: argparse.ArgumentParser, *, image: bool = False, member_labels: bool = False) -> None:
    """Add the shared flags; ``image=True`` adds ``--image-column``; ``member_labels=True`` documents that
    the command maps class names through the members' ``id2label`` by default (``dedup``)."""
    g = parser.add_argument_group(
        "data sources",
        "Every data flag takes " + SOURCE_HELP + " (read through datasets; with HF_DATASETS_OFFLINE=1 a Hub "
        "data set comes from the datasets cache). Labels: integers, a ClassLabel column, or class names mapped "
        "to ids by --label-names (in id order" + ("; default: the members' id2label when it names real classes"
                                                  if member_labels else "") + ").",
    )
    g.add_argument("--text-column", metavar="NAME", default="sentence",
                   help="column holding the text (default: sentence)")
    g.add_argument("--label-column", metavar="NAME", default="label", help="column holding the class (default: label)")
    if image:
        g.add_argument("--image-column", metavar="NAME",
                       help="column holding the image (image-classification; default: image)")
    g.add_argument("--dataset-config", metavar="NAME",
                   help="config name of a Hub data set with several (e.g. sst2 of nyu-mll/glue)")
    g.add_argument("--dataset-revision", metavar="REV", help="branch, tag or commit of a Hub data set (default: main)")
    g.add_argument("--label-names", nargs="+", metavar="NAME",
                   help="class names in id order, for a label column of names (e.g. negative positive)")


def data_source(args: argparse.Namespace, spec: str, *, label_names: tuple[str, ...] | None = None) -> DataSource:
    """The :class:`DataSource` a data flag's value names, with the command's column and config flags.
    ``label_names`` is the default when ``--label-names`` is not given."""
    return DataSource.parse(
        spec, text_column=args.text_column, label_column=args.label_column,
        image_column=getattr(args, "image_column", None), config_name=args.dataset_config,
        revision=args.dataset_revision,
        label_names=tuple(args.label_names) if args.label_names else label_names,
    )
