"""DP family training: fine-tune one base on one private data set at several privacy budgets.

Public API:

* :func:`train_text_family` — a sequence-classification family, saved as transformers folders
  with ``privacy.json`` and ``training_args.json`` per member (the ``train-family`` command).
* :func:`train_members` — the task-independent family loop (used by the benchmark families).
* :func:`train_dp` / :class:`DPConfig` / :class:`DPResult` — one Opacus DP-SGD run on any module.
* :class:`LARS` — layer-wise adaptive rate scaling, usable under Opacus.
* :mod:`.lora` — DP-LoRA: :class:`LoraSpec` / :func:`parse_lora_spec`, :func:`wrap_lora`,
  :class:`LoraMemberSaver` (members as peft adapter folders or merged models).
* :mod:`.tasks` — per-example utility scores (in [0, 1]) the dedup engine validates with.
* :mod:`.data` — text data from any source (:func:`load_text_data`; :func:`read_tsv` for a TSV), deterministic private splits, scikit-learn digits halves.
"""

from .data import (TextClassificationData, from_dataset, load_digits_halves, load_text_data, read_tsv, split_indices,
                   split_private)
from .family import MemberSaver, MemberSummary, check_family_request, train_members
from .lars import LARS
from .lora import LoraMemberSaver, LoraSpec, parse_lora_spec, save_lora_member, wrap_lora
from .members import changed_tensors, load_privacy, member_dirname, save_member
from .opacus_train import DPConfig, DPResult, calibrate_noise, train_dp, validate_budget
from .tasks import classification_correct, mean_score, next_token_accuracy
from .text import load_base, train_text_family

__all__ = [
    "DPConfig", "DPResult", "LARS", "LoraMemberSaver", "LoraSpec", "MemberSaver", "MemberSummary",
    "TextClassificationData", "calibrate_noise", "changed_tensors", "check_family_request",
    "classification_correct", "from_dataset", "load_base", "load_digits_halves", "load_privacy", "load_text_data",
    "mean_score", "member_dirname", "next_token_accuracy", "parse_lora_spec", "read_tsv", "save_lora_member",
    "save_member", "split_indices", "split_private", "train_dp", "train_members", "train_text_family",
    "validate_budget", "wrap_lora",
]
