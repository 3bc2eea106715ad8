"""Distributed dedup benchmark: wall time of one family with 1 vs. 2 (or N) processes.

    python benchmarks/distributed_benchmark.py [--processes 1 2] [--threads 1] [--repeats 2] [--gpu]

Every configuration is a ``torchrun`` launch of this same file in worker mode; each process builds
the same synthetic family (seeded), waits at a barrier, and times
``deduplicate_family_distributed`` alone (process start-up and model building excluded; the
launch's total wall time is reported beside it). The family is validation-bound on purpose: 3
BERT members (2 layers, hidden 128, 0.6 M parameters each, 4,096-value blocks), public validation
on 2,048 sequences of 16 tokens in 16 batches, binary search (min group 8). The stores of all runs must be byte-identical (store id
aside): the benchmark checks it. ``--validation svt`` uses private validation (seeded test noise).

Writes flat ``benchmarks/results/distributed.json``. With ``--gpu`` each process uses one GPU
(NCCL): run it with ``--processes 1 N`` on a machine with N GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_VAL, N_TEST, BATCH, LENGTH, VOCAB = 2048, 256, 128, 16, 1000


def build_family(validation: str):
    """Members = a teacher plus Gaussian noise that shrinks with ε; labels = the teacher's predictions."""
    import torch
    import transformers

    from hf_dpdedup.dedup.config import VALIDATIONS, Binary, DedupConfig
    from hf_dpdedup.dedup.planner import DedupData, Member
    from hf_dpdedup.dedup.tasks import classification_score
    from hf_dpdedup.privacy import PrivacyMetadata, PrivateDataset

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=512, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (N_VAL + N_TEST, LENGTH), generator=g)
    with torch.no_grad():
        labels = torch.cat([teacher(input_ids=ids[i : i + 512]).logits.argmax(-1) for i in range(0, len(ids), 512)])
    members = []
    for eps, noise in ((1.0, 0.3), (4.0, 0.1), (8.0, 0.0)):
        model = transformers.BertForSequenceClassification(cfg).eval()
        model.load_state_dict(teacher.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
        members.append(Member(f"eps{eps:g}", model, PrivacyMetadata(eps, 1e-5, ("bench-train",))))
    batches = [{"input_ids": ids[i : i + BATCH], "labels": labels[i : i + BATCH]} for i in range(0, len(ids), BATCH)]
    n_val = N_VAL // BATCH
    private = None
    if validation != "public":
        private = PrivateDataset({"input_ids": ids[:N_VAL], "labels": labels[:N_VAL]}, dataset_id="bench-train",
                                 public_size=N_VAL, batch_size=BATCH)
    data = DedupData(classification_score, public_val=batches[:n_val], public_test=batches[n_val:],
                     private_val=private)
    config = DedupConfig(block_size=4096, threshold=0.02, strategy=Binary(min_group=8),
                         validation=VALIDATIONS[validation](), noise_seed=0 if validation != "public" else None)
    return members, data, config


def worker(out: Path, validation: str, gpu: bool) -> None:
    import torch
    import torch.distributed as dist

    from hf_dpdedup.distributed import deduplicate_family_distributed, init_state

    state = init_state(cpu=not gpu)
    members, data, config = build_family(validation)
    if dist.is_initialized():
        dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    report = deduplicate_family_distributed(members, data, config, out / "store", state=state)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if state.is_main_process:
        summary = report.summary()
        (out / "timing.json").write_text(json.dumps({
            "seconds": seconds, "cpu_seconds": cpu_seconds, "validations": summary["validations"],
            "threads": torch.get_num_threads(),
            "targets_compression": summary["targets_compression"],
        }))


def launch(processes: int, threads: int, validation: str, gpu: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--max-restarts",
               "0", "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker", tmp,
               "--validation", validation] + (["--gpu"] if gpu else [])
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        result = json.loads((Path(tmp) / "timing.json").read_text())
        result["launch_seconds"] = time.perf_counter() - start
        result["store"] = store_digest(Path(tmp) / "store")
    return result


def store_digest(root: Path) -> str:
    import hashlib

    store_id = json.loads((root / "block_store" / "block_store.json").read_text())["store_id"]
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(root)).encode())
            digest.update(p.read_bytes().replace(store_id.encode(), b"STORE-ID"))
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--validation", default="public", choices=["public", "svt"])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--reference-threads", type=int, default=0,
                        help="also time 1 process with this many threads (same cores as 2 single-thread processes)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.validation, args.gpu)
        return
    from common import write_results

    configs = [(n, args.threads) for n in args.processes]
    if args.reference_threads and not args.gpu:
        configs.append((1, args.reference_threads))
    figures, digests = {}, set()
    for processes, threads in configs:
        runs = [launch(processes, threads, args.validation, args.gpu) for _ in range(args.repeats)]
        digests |= {r["store"] for r in runs}
        key = f"{args.validation}_{'gpu' if args.gpu else 'cpu'}_{processes}proc_{threads}thr"
        figures[f"{key}_dedup_s"] = statistics.median(r["seconds"] for r in runs)
        figures[f"{key}_main_cpu_s"] = statistics.median(r["cpu_seconds"] for r in runs)  # main process only
        figures[f"{key}_launch_s"] = statistics.median(r["launch_seconds"] for r in runs)
        figures[f"{key}_validations"] = runs[0]["validations"]
        print(key, [round(r["seconds"], 2) for r in runs], flush=True)
    if len(digests) != 1:
        raise SystemExit(f"stores differ between configurations: {sorted(digests)}")
    base = f"{args.validation}_{'gpu' if args.gpu else 'cpu'}"
    one = figures[f"{base}_1proc_{args.threads}thr_dedup_s"]
    for n in args.processes:
        if n != 1:
            figures[f"{base}_speedup_{n}proc_vs_1"] = one / figures[f"{base}_{n}proc_{args.threads}thr_dedup_s"]
            figures[f"{base}_main_cpu_share_{n}proc"] = (figures[f"{base}_{n}proc_{args.threads}thr_main_cpu_s"]
                                                         / figures[f"{base}_1proc_{args.threads}thr_main_cpu_s"])
    figures["stores_identical"] = 1.0
    figures["cpu_cores"] = os.cpu_count()
    figures["load_average_1min_at_end"] = os.getloadavg()[0]
    path = HERE / "results" / "distributed.json"  # one flat file: earlier figures of other settings stay
    previous = json.loads(path.read_text()) if path.is_file() else {}
    write_results("distributed", {**previous, **figures})


if __name__ == "__main__":
    main()
