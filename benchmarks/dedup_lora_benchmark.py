"""Dedup of the GPT-2 LM families: DP-LoRA members merged and as adapters, and full DP fine-tunes.

    python benchmarks/dedup_lora_benchmark.py [--family benchmarks/families/gpt2-sst2-lora] [--thresholds 0.005 0.0025]
    python benchmarks/dedup_lora_benchmark.py --family benchmarks/families/gpt2-sst2-lm --confirm --old

A family folder with ``merged/`` and ``adapter/`` is a DP-LoRA family (both forms are run); any
other family folder holds full fine-tunes (``eps-<ε>/`` beside ``base/``: form ``full``, every
transformer block tensor DP-trained, see ``gpt2_sst2_lm.py``). ``--confirm`` searches on the first
half of the ``dev`` sentences and confirms on the second; ``--old`` adds the paper's engine
(nearest block over base ∪ own, magnitude saliency order, no confirmation) beside the default.
Results: ``results/dedup_lora.json`` for the LoRA family, ``results/dedup_<family>.json`` otherwise.

The family (``benchmarks/families/gpt2_sst2_lora.py``): one public GPT-2 base, DP-LoRA members at
ε 1, 2, 4, 8, each saved as a peft adapter folder and merged. The same engine and configuration on
both forms: public validation = SST-2 ``dev`` sentences (872), utility = mean per-sentence
next-token accuracy, public test = ``test`` sentences (1,821, reported only), gallop, Fisher cost on
the validation sentences, interactive floor, fairness verdict on test (flag), block size 256 (a
LoRA matrix of this family has 256-1,024 elements: with larger blocks an adapter tensor would be an
extra, stored whole). The merged members are full ``GPT2LMHeadModel`` folders (every LoRA-targeted
``Conv1D`` weight changed by DP training); the adapter members are ``PeftModel``s whose base
weights are shared exactly and whose ``lora_A``/``lora_B`` are deduplicated.

Thresholds are in utility points of next-token accuracy; the members are 0.45-1.04 points above
the base on validation, so the usual 1.5 points would let every member fall back to the ε = 1 one.
Bytes are weights only (shards, index, constitutions, extras; not the tokenizer and config files
every member folder copies): raw = the members' safetensors files (merged) or the base's plus every
adapter file (adapters); peer = ZipNN on those same tensors, each file alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "families"))

from common import write_results  # noqa: E402
from gpt2_sst2_lm import encode, load_splits  # noqa: E402
from lossless_benchmark import Member as FileMember, raw_and_coded_weight_bytes, zipnn_bytes, zipnn_family  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_dpdedup.dedup.config import PlanConfig  # noqa: E402
from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member  # noqa: E402
from hf_dpdedup.dedup.storing import deduplicate_family  # noqa: E402
from hf_dpdedup.dedup.tasks import token_accuracy_score  # noqa: E402
from hf_dpdedup.distributed import load_member_model  # noqa: E402
from hf_dpdedup.training.members import load_privacy  # noqa: E402

BLOCK = 256
OLD = PlanConfig(candidates="nearest", order="saliency", saliency="magnitude", close_ratio=None)


def forms(family: Path) -> dict[str, Path]:
    """Each saved form's member folder: a DP-LoRA family keeps ``merged/`` and ``adapter/``; a family
    of full fine-tunes keeps its members at the top (form ``full``)."""
    return {f: family / f for f in ("merged", "adapter") if (family / f).is_dir()} or {"full": family}


def batches(tokenizer, texts: list[str], size: int = 256) -> list[dict[str, torch.Tensor]]:
    packed = encode(tokenizer, texts)
    return [{"input_ids": packed[i : i + size, 0], "attention_mask": packed[i : i + size, 1]}
            for i in range(0, len(packed), size)]


def lm_loss(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def members(folder: Path) -> list[Member]:
    found = sorted((p for p in folder.iterdir() if (p / "privacy.json").is_file()),
                   key=lambda p: load_privacy(p).epsilon)
    return [Member(p.name, load_member_model(p), load_privacy(p), files_from=p) for p in found]


def peer_bytes(form: str, folders: list[Path], base: Path) -> int:
    files = [base / "model.safetensors"] if form == "adapter" else []
    files += [f / ("adapter_model.safetensors" if form == "adapter" else "model.safetensors") for f in folders]
    return sum(sum(zipnn_bytes(t) for t in load_file(f).values()) for f in files)


def peer_xor_bytes(form: str, folders: list[Path], base: Path) -> int:
    """ZipNN with XOR: the first member's file (the smallest ε: the dedup base) alone, every other
    member's file XOR it tensor by tensor; for adapters the base model's file alone plus the adapter
    files coded that way."""
    name = "adapter_model.safetensors" if form == "adapter" else "model.safetensors"
    files = [FileMember(f.name, load_file(f / name), None) for f in folders]
    base_bytes = sum(zipnn_bytes(t) for t in load_file(base / "model.safetensors").values()) if form == "adapter" else 0
    return base_bytes + zipnn_family(files)[1]


def raw_bytes(form: str, folders: list[Path], base: Path) -> int:
    name = "adapter_model.safetensors" if form == "adapter" else "model.safetensors"
    return ((base / "model.safetensors").stat().st_size if form == "adapter" else 0) + \
        sum((f / name).stat().st_size for f in folders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, default=HERE / "families" / "gpt2-sst2-lora")
    parser.add_argument("--base", type=Path, default=HERE / "families" / "gpt2-sst2-lm" / "base")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.005, 0.0025])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--confirm", action="store_true", help="search on half of dev, confirm on the other half")
    parser.add_argument("--old", action="store_true", help="also run the paper's engine (no confirmation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.base)
    splits = load_splits()
    val, test = splits["public_val"], batches(tokenizer, splits["public_test"])
    half = len(val) // 2
    data = DedupData(token_accuracy_score, public_val=batches(tokenizer, val), public_test=test,
                     calibration_loss=lm_loss)
    confirmed = DedupData(token_accuracy_score, public_val=batches(tokenizer, val[:half]), public_test=test,
                          public_confirm=batches(tokenizer, val[half:]), calibration_loss=lm_loss)
    runs = {"": (confirmed if args.confirm else data, {})}
    if args.old:
        runs["old_"] = (data, {"plan": OLD, "floor_margin_se": 0.0})  # the paper: exact floor
    figures: dict[str, float] = {}
    rows = []
    family_forms = forms(args.family)
    for form, form_dir in family_forms.items():
        folders = [m.files_from for m in members(form_dir)]
        figures[f"{form}_members_raw_bytes"] = raw_bytes(form, folders, args.base)
        figures[f"{form}_zipnn_peer_bytes"] = peer_bytes(form, folders, args.base)
        figures[f"{form}_zipnn_xor_peer_bytes"] = peer_xor_bytes(form, folders, args.base)
        for (run, (run_data, options)), threshold in ((r, t) for r in runs.items() for t in args.thresholds):
            family = members(form_dir)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                report = deduplicate_family(family, run_data,
                                            DedupConfig(block_size=BLOCK, threshold=threshold, **options),
                                            Path(tmp) / "store")
                # weights only, as raw and peer
                stored, coded = raw_and_coded_weight_bytes(Path(tmp) / "store", Path(tmp) / "coded")
            seconds = time.perf_counter() - started
            key = f"{run}{form}_t{threshold:g}"
            targets = report.targets
            own = sum(t.own_bytes for t in targets) / sum(t.original_bytes for t in targets)
            own_dp = sum(t.own_bytes_differing for t in targets) / sum(t.original_bytes_differing for t in targets)
            figures.update({
                f"{key}_seconds": seconds, f"{key}_family_stored_bytes": report.family_stored_bytes,
                f"{key}_weight_bytes": stored,
                f"{key}_targets_own_over_original_all": own, f"{key}_targets_own_over_original_dp_changed": own_dp,
                f"{key}_weights_over_members_raw": stored / figures[f"{form}_members_raw_bytes"],
                f"{key}_weights_over_zipnn_peer": stored / figures[f"{form}_zipnn_peer_bytes"],
                f"{key}_coded_weight_bytes": coded,
                f"{key}_coded_weights_over_zipnn_xor_peer": coded / figures[f"{form}_zipnn_xor_peer_bytes"],
                f"{key}_weights_over_zipnn_xor_peer": stored / figures[f"{form}_zipnn_xor_peer_bytes"],
            })
            for m in report.models:
                figures[f"{key}_{m.name}_val_before"] = m.val_utility_before
                figures[f"{key}_{m.name}_val_after"] = m.val_utility_after
                figures[f"{key}_{m.name}_test_before"] = m.test_utility_before
                figures[f"{key}_{m.name}_test_after"] = m.test_utility_after
                if m.role == "target":
                    figures[f"{key}_{m.name}_own_dp_changed"] = m.own_bytes_differing / m.original_bytes_differing
                    figures[f"{key}_{m.name}_validations"] = m.validations
                    figures[f"{key}_{m.name}_confirmations"] = m.confirmations
                    figures[f"{key}_{m.name}_test_se"] = m.test_utility_se or 0.0
                    figures[f"{key}_{m.name}_epsilon_ledger"] = m.ledger.epsilon
                rows.append((run + form, threshold, m))
            print(f"{run}{form} t={threshold:g}: {seconds:.0f} s, targets own/original all {own:.3f}, DP-changed "
                  f"{own_dp:.3f}, weights stored {stored:,} B, coded {coded:,} B (ZipNN XOR peer "
                  f"{figures[f'{form}_zipnn_xor_peer_bytes']:,} B)", flush=True)
    write_results("dedup_lora" if "merged" in family_forms else f"dedup_{args.family.name.replace('-', '_')}",
                  figures)
    print("\n| form | t (points) | member | role | ε ledger | blocks from base / searched | own / original "
          "(DP-changed) | validations (+conf.) | val before → after | test before → after (± SE) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for form, threshold, m in rows:
        eps = f"{m.ledger.epsilon:.2f}" if m.ledger is not None else f"{m.epsilon_before:g}"
        own = f"{m.own_bytes_differing / m.original_bytes_differing:.3f}" if m.role == "target" else "—"
        searched = f"{m.from_base} / {m.candidates}" if m.role == "target" else "—"
        checks = f"{m.validations} (+{m.confirmations})" if m.role == "target" else "—"
        print(f"| {form} | {threshold * 100:g} | {m.name} | {m.role} | {eps} | {searched} | {own} | {checks} | "
              f"{m.val_utility_before:.4f} → {m.val_utility_after:.4f} | "
              f"{m.test_utility_before:.4f} → {m.test_utility_after:.4f} (± {m.test_utility_se or 0:.4f}) |")
    print(json.dumps({k: v for k, v in figures.items() if "bytes" in k or "peer" in k or "raw" in k}, indent=1))


if __name__ == "__main__":
    main()
