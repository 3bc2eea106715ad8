"""Load benchmark: rebuilding a member from a local store vs. transformers on the original folder.

Measured in one run, as ratios (the machine is shared and noisy):
- ``load_ratio_*``: ``DedupedModel.from_pretrained`` ÷ ``AutoModel.from_pretrained`` on the
  original safetensors folder, for a member stored contiguously (the first one in a store:
  zero-copy views of the shard) and for a member whose rows are scattered (gathered):
  ``first_load`` — the first load of those bytes in a warm process (imports done, the per-process
  verification cache cleared before each load, so every file is checked: xxh3-128 over the mapped
  bytes; target ≤ 1.1); ``steady`` — files already checked in this process; ``sha256_first_load`` —
  the same first load for a store without fast digests (stores written before them: sha256 at load).
  The scattered member's tensors are mapped from the shard files (``store/remap.py``);
  ``scattered_copied`` is the same member with its rows copied into memory instead (as before).
- ``new_process_ratio_*``: a whole new Python process (imports included) loading the member ÷ one
  loading the original folder with transformers.
- ``rebuild_vs_memcpy``: rebuild throughput (gathering a member's rows from the in-memory block
  matrix into its tensors) ÷ the throughput of a plain memory copy of the same bytes (target ≥ 0.5).

Run: python benchmarks/load_benchmark.py [--repeats 7] [--process-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from common import median_seconds, minilm_folder, new_process, paired, write_results
from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.store.io import forget_verified
from hf_dpdedup.store.member import _gather, read_constitution
from hf_dpdedup.store.remap import SWITCH


def scrambled_copy(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict whose every other block-sized chunk of each big tensor is perturbed, so the
    member shares half of its rows with the original and its rows are not one run per tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        t = t.clone()
        if t.numel() >= 16384:
            flat = t.view(-1)
            for start in range(0, flat.numel(), 2 * 16384):
                chunk = flat[start : start + 16384]
                chunk.add_(1e-3 * torch.randn(chunk.shape, generator=g))
        out[name] = t
    return out


def without_fast_digests(family: FamilyStore, members: list[Path]) -> None:
    """Make the store and members look as if written before fast digests existed (sha256 at load)."""
    def edit(path: Path, drop) -> None:
        data = json.loads(path.read_text())
        drop(data)
        path.write_text(json.dumps(data))

    edit(family.blocks.path / "block_store.json", lambda d: [s.pop("xxh3_128", None) for s in d["shards"]])
    for member in members:
        edit(member / "dedup_constitution.json", lambda d: d["extras"].pop("xxh3_128", None))


def load_member(member: Path, *, copy_rows: bool = False) -> torch.nn.Module:
    """``DedupedModel.from_pretrained``; with ``copy_rows`` scattered rows are copied into memory
    instead of mapped from the shard files (``HF_DPDEDUP_MAP_ROWS=0``, see ``store/remap.py``)."""
    if not copy_rows:
        return DedupedModel.from_pretrained(member)
    os.environ[SWITCH] = "0"
    try:
        return DedupedModel.from_pretrained(member)
    finally:
        del os.environ[SWITCH]


NEW_PROCESS = {
    "hf": "from transformers import AutoModel; AutoModel.from_pretrained({path!r})",
    "dedup": "from hf_dpdedup import DedupedModel; DedupedModel.from_pretrained({path!r})",
}


def load_process(kind: str, path: Path):
    """A fresh interpreter that imports and loads ``path`` with ``kind``'s loader, as a callable."""
    return new_process(NEW_PROCESS[kind].format(path=str(path)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--process-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = minilm_folder()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = AutoModel.from_pretrained(folder).eval()
        family = FamilyStore.create(tmp / "family", block_size=16384)
        family.add_model("base", base, files_from=folder)
        family.add_model("mixed", scrambled_copy(base), files_from=folder)
        member_base, member_mixed = family.member_path("base"), family.member_path("mixed")
        load_hf = lambda: AutoModel.from_pretrained(folder)  # noqa: E731
        for _ in range(2):  # warm caches and imports for every path
            load_hf(), DedupedModel.from_pretrained(member_base), DedupedModel.from_pretrained(member_mixed)

        figures = {"hf_load_s": median_seconds(load_hf, args.repeats)}
        members = (("contiguous", member_base), ("scattered", member_mixed))
        copied = (("scattered_copied", member_mixed),)  # the same member, its rows copied, not mapped
        for label, member in members + copied:
            load = lambda m=member, c=label.endswith("copied"): load_member(m, copy_rows=c)  # noqa: E731
            t_first, _, ratio_first = paired(load, load_hf, args.repeats, setup=forget_verified)
            t_steady, _, ratio_steady = paired(load, load_hf, args.repeats)
            figures[f"dedup_load_{label}_first_load_s"] = t_first
            figures[f"dedup_load_{label}_steady_s"] = t_steady
            figures[f"load_ratio_{label}_first_load"] = ratio_first
            figures[f"load_ratio_{label}_steady"] = ratio_steady

        hf_process = load_process("hf", folder)
        for label, member in members:
            t_process, t_hf_process, ratio = paired(load_process("dedup", member), hf_process, args.process_repeats)
            figures[f"dedup_new_process_{label}_s"] = t_process
            figures[f"hf_new_process_{label}_pair_s"] = t_hf_process
            figures[f"new_process_ratio_{label}"] = ratio

        # The same first load where the store has no fast digests (written before they existed).
        without_fast_digests(family, [m for _, m in members])
        for label, member in members:
            load = lambda m=member: DedupedModel.from_pretrained(m)  # noqa: E731
            figures[f"load_ratio_{label}_sha256_first_load"] = paired(load, load_hf, args.repeats, setup=forget_verified)[2]
        figures["hf_load_drift"] = median_seconds(load_hf, args.repeats) / figures["hf_load_s"]

        # Rebuild throughput: gather every tensor of the scattered member from the in-memory matrix.
        constitution = read_constitution(member_mixed)
        store = family.blocks
        matrices = {k: v.clone() for k, v in store.read_shards(store.index.shards).items()}
        starts = np.array(sorted(matrices), dtype=np.int64)
        nbytes = sum(len(t.rows) for t in constitution.tensors) * store.block_size * store.dtype.itemsize

        def rebuild() -> None:
            for entry in constitution.tensors:
                _gather(entry.rows, starts, matrices, store, may_view=False)

        source = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
        t_rebuild = median_seconds(rebuild, args.repeats)
        t_memcpy = median_seconds(lambda: source.clone(), args.repeats)
        figures["rebuild_gbps"] = nbytes / t_rebuild / 1e9
        figures["memcpy_gbps"] = nbytes / t_memcpy / 1e9
        figures["rebuild_vs_memcpy"] = t_memcpy / t_rebuild
    write_results("load", figures)


if __name__ == "__main__":
    main()
