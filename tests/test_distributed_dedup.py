"""Distributed dedup on 2 CPU processes (gloo, started with torchrun) against the single-process run.

The same file is the worker: ``torchrun --nproc_per_node 2 tests/test_distributed_dedup.py OUT SCENARIO...``
runs the scenarios in order in one launch (starting processes dominates the time). Each writes its
store and a JSON of its report (plan counts, validations, utilities, ledgers, charges) under OUT;
the tests rebuild the same family in-process with ``deduplicate_family`` and compare. The last
scenario kills process 1 mid-search: the launch must fail with a clear error and no store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.tasks import classification_score
from hf_dpdedup.privacy import PrivacyMetadata, PrivateDataset

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_dedup import write_members  # noqa: E402
from test_dedup_engine import BLOCK, make_family  # noqa: E402

SCENARIOS = ("public", "svt", "naive", "groups")
LAUNCH_TIMEOUT_S = 150


def cli_args(inputs: Path, out: Path) -> list[str]:
    folders = sorted(str(p) for p in inputs.iterdir() if p.name.startswith("eps-"))
    return ["dedup", *folders, "--out", str(out), "--val", str(inputs / "val.tsv"), "--test", str(inputs / "test.tsv"),
            "--threshold", "0.05", "--block-size", "4096", "--strategy", "halving", "--cpu"]


# --- the family of each scenario (built identically in the tests and in the workers) -----------------
def scenario(name: str):
    members, batches = make_family()
    if name == "groups":  # a second group: same architecture, another training data set
        others, _ = make_family()
        for m in others:
            members.append(Member(f"other-{m.name}", m.model,
                                  PrivacyMetadata(m.privacy.epsilon, 1e-5, ("other-train",))))
            with torch.no_grad():  # different weights, so the two groups store different rows
                for p in m.model.parameters():
                    p.mul_(1.5)
    private = None
    validation = "public" if name == "groups" else name
    if validation != "public":
        rows = {"input_ids": torch.cat([b["input_ids"] for b in batches[:3]]),
                "labels": torch.cat([b["labels"] for b in batches[:3]])}
        private = PrivateDataset(rows, dataset_id="toy-train", public_size=300,
                                 batch_size=64)  # 300 rows: 5 batches, last of 44
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:], private_val=private)
    config = DedupConfig(block_size=BLOCK, threshold=0.03, strategy="binary", validation=validation,
                         svt_epsilon=1.0, svt_cutoff=3, naive_epsilon=0.1, noise_seed=7)
    return members, data, config


def summary(report, private) -> dict:
    models = []
    for m in report.models:
        d = m.to_dict()
        d["ledger"] = m.ledger.to_dict() if m.ledger is not None else None
        d["charges"] = [c.to_dict() if hasattr(c, "to_dict") else repr(c) for c in m.charges]
        models.append(d)
    out = {"models": models, "family_stored_bytes": report.family_stored_bytes}
    if private is not None:
        out["raw_accesses"] = private.raw_accesses
        out["charged_reads"] = private.charged_reads
    return out


def store_files(root: Path) -> dict[str, bytes]:
    """Every stored file's bytes, with the random store id normalised."""
    store_id = json.loads((root / "block_store" / "block_store.json").read_text())["store_id"]
    return {str(p.relative_to(root)): p.read_bytes().replace(store_id.encode(), b"STORE-ID")
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- worker ----------------------------------------------------------------------------------------
def worker(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    from hf_dpdedup.cli import main
    from hf_dpdedup.distributed import deduplicate_family_distributed, init_state

    state = init_state(cpu=True, timeout_s=60)
    for name in names:
        if name == "cli":  # the command line's own distributed path, in these processes
            assert main(cli_args(out / "cli_inputs", out / "cli" / "store")) == 0
            continue
        members, data, config = scenario("public" if name == "kill" else name)
        if name == "kill":  # process 1 dies in the middle of the search
            data.score_fn = dying_on(state.process_index == 1, call=12)
        parallel = "groups" if name == "groups" else "data"
        report = deduplicate_family_distributed(members, data, config, out / name / "store", parallel=parallel,
                                                state=state)
        if state.is_main_process:
            (out / name / "report.json").write_text(json.dumps(summary(report, data.private_val)))
        else:
            assert report is None
        if data.private_val is not None:
            assert data.private_val.raw_accesses == 0


def dying_on(this_process: bool, *, call: int):
    calls = {"n": 0}

    def score(model, batch):
        calls["n"] += 1
        if this_process and calls["n"] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return classification_score(model, batch)

    return score


# --- tests -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # the workers import this checkout's package (not whatever `pip install -e` points at)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "0",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One torchrun launch of 2 processes running every scenario, then the kill."""
    out = tmp_path_factory.mktemp("dist")
    inputs = out / "cli_inputs"
    inputs.mkdir()
    write_members(inputs)
    proc = torchrun([__file__, str(out), *SCENARIOS, "cli", "kill"], cwd=out)
    return out, proc


def finished(launch, name: str) -> Path:
    out, proc = launch
    assert (out / name / "store").is_dir(), proc.stderr[-4000:]
    return out / name


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_match_one_process(launch, tmp_path, name):
    folder = finished(launch, name)
    members, data, config = scenario(name)
    report = deduplicate_family(members, data, config, tmp_path / "store")
    expected = summary(report, data.private_val)
    got = json.loads((folder / "report.json").read_text())
    assert got == json.loads(json.dumps(expected))  # plan counts, validations, utilities, ledgers, charges
    assert store_files(folder / "store") == store_files(tmp_path / "store")
    assert any(m["from_base"] + m["from_self"] > 0 for m in got["models"])  # something was deduplicated
    if data.private_val is not None:
        assert got["raw_accesses"] == 0 and got["charged_reads"] == data.private_val.charged_reads
    if name == "groups":
        assert {m["name"] for m in got["models"]} == {m.name for m in members}


def test_the_command_line_under_torchrun_matches_one_process(launch, tmp_path):
    from hf_dpdedup.cli import main

    folder = finished(launch, "cli")
    assert main(cli_args(launch[0] / "cli_inputs", tmp_path / "store")) == 0
    one, two = store_files(tmp_path / "store"), store_files(folder / "store")
    is_report = lambda name: name.startswith("report/")  # noqa: E731 - timings and plots differ
    assert {k: v for k, v in two.items() if not is_report(k)} == {k: v for k, v in one.items() if not is_report(k)}
    assert (folder / "store" / "report" / "dedup_report.json").is_file()  # saved once, by the main process


def test_a_killed_process_aborts_the_run_and_leaves_no_store(launch):
    out, proc = launch
    assert proc.returncode != 0
    assert "PeerFailureError" in proc.stderr, proc.stderr[-4000:]
    assert not (out / "kill" / "store").exists()
    assert not list(out.glob("kill/.store.partial-*"))  # the staging folder was removed


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
