"""Crashes and races with real processes: writers killed with SIGKILL at chosen points, writers
re-adding one member while another process reads it. Every read must give the member's old or new
version bit-exactly, or a typed retryable error; no kill may lose a member or leave temporaries
behind after the next write. (Each child imports torch: the whole file takes ~20 s on 2 busy cores.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.errors import MemberChangedError
from hf_dpdedup.store.io import forget_verified

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]

# Writers in one child: it imports once, then forks one writer per job (so the test pays for one
# torch import, not one per writer). A job re-adds member NAME from saved state dicts `repeat` times,
# alternating them; its `point` names where it kills itself with SIGKILL (patching its own functions
# only). The child prints the writers' pids, then each one's exit status: "<pid> <status>".
WRITERS = r"""
import json, os, signal, sys
from safetensors.torch import load_file
import hf_dpdedup.store.block_store as block_store
import hf_dpdedup.store.io as io
from hf_dpdedup.store.family import FamilyStore

def run(point, family, name, folder, repeat, versions):
    final = os.path.join(family, "members", name)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_exchange, real_replace, real_save = getattr(io, "exchange", None), os.replace, block_store.save_shard

    def replace(src, dst):
        real_replace(src, dst)
        if point == "between-renames" and os.fspath(src) == final:
            die()  # the old member moved away, the new one not in yet

    def exchange(a, b):
        if point == "between-renames":
            return False  # what a platform without RENAME_EXCHANGE does
        if point == "before-swap":
            die()
        done = real_exchange(a, b)
        if point == "after-swap":
            die()  # the previous version is still in its temporary folder
        return done

    def save_shard(path, rows, metadata):
        real_save(path, rows, metadata)
        if point == "shard-written":
            die()  # a new shard on disk under its temporary name, the index not switched

    io.exchange, os.replace, block_store.save_shard = exchange, replace, save_shard
    states = [load_file(v) for v in versions]
    store = FamilyStore.open(family)
    for i in range(repeat):
        store.add_model(name, states[i % len(states)], files_from=folder)

pids = []
for job in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            run(**job)
            os._exit(0)
        except BaseException as exc:
            print(f"{os.getpid()} failed: {exc!r}", file=sys.stderr, flush=True)
            os._exit(1)
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
for pid in pids:
    print(pid, os.waitpid(pid, 0)[1], flush=True)
"""

KILL_POINTS = ["shard-written", "before-swap", "between-renames", "after-swap"]


class Writers:
    """The writer processes of one child (see WRITERS): their pids, then their exit statuses."""

    def __init__(self, jobs: list[dict]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-c", WRITERS, json.dumps(jobs, default=str)]
        self.child = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pids = [int(p) for p in self.child.stdout.readline().split()]
        assert len(self.pids) == len(jobs), self.child.stderr.read()

    def alive(self) -> bool:
        return self.child.poll() is None

    def statuses(self) -> list[int]:
        """Each writer's wait status, in job order (0: finished; SIGKILL: killed)."""
        # read through the same buffered stream readline() used (communicate() would skip its buffer)
        out, err = self.child.stdout.read(), self.child.stderr.read()
        self.child.wait(timeout=120)
        status = dict(line.split() for line in out.splitlines())
        assert all(str(p) in status for p in self.pids), (out, err)
        return [os.waitstatus_to_exitcode(int(status[str(p)])) for p in self.pids], err


def job(point: str, root: Path, folder: Path, repeat: int, *versions: Path) -> dict:
    return {"point": point, "family": root, "name": "m", "folder": folder, "repeat": repeat, "versions": versions}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two versions of one member (different weights, so new rows), saved for the children."""
    folder = tmp_path_factory.mktemp("versions")
    out = {}
    for seed in (10, 11):
        model = tiny_model("bert", seed=seed)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / f"v{seed}.safetensors")
        out[seed] = state
    return folder, out


def make_family(root: Path, folder: Path, versions: dict) -> FamilyStore:
    family = FamilyStore.create(root, block_size=128)
    family.add_model("m", versions[10], files_from=folder)
    family.add_model("other", tiny_model("bert", seed=3))
    return family


def which_version(family: FamilyStore, versions: dict) -> int:
    """10 or 11: the version the member loads as, bit for bit (anything else fails the test)."""
    state = DedupedModel.from_pretrained(family.member_path("m")).state_dict()
    for seed, expected in versions.items():
        if all(torch.equal(state[k], v) for k, v in expected.items()):
            return seed
    raise AssertionError("member m loaded weights of neither version")


def leftovers(family: FamilyStore) -> list[str]:
    folders = (family.blocks.path, family.root / "members")
    return sorted(p.name for d in folders for p in d.iterdir() if p.name.endswith((".tmp", ".old")))


def test_sigkill_at_each_point_of_a_write_keeps_the_member_loadable(tmp_path, versions):
    folder, states = versions
    families = {p: make_family(tmp_path / p, folder, states) for p in KILL_POINTS}
    writers = Writers([job(p, families[p].root, folder, 1, folder / "v11.safetensors") for p in KILL_POINTS])
    codes, err = writers.statuses()
    assert codes == [-signal.SIGKILL] * len(KILL_POINTS), err
    for point, family in families.items():
        forget_verified()
        family = FamilyStore.open(family.root)
        assert family.members() == ["m", "other"], point
        seen = which_version(family, states)
        assert seen == (11 if point == "after-swap" else 10), point  # old, or new once swapped in
        assert which_version(family, states) == seen
        family.add_model("m", states[11], files_from=folder)  # the next write recovers and cleans up
        assert leftovers(family) == [], point
        assert which_version(family, states) == 11


def test_writers_racing_readers_and_a_killed_writer(tmp_path, versions):
    folder, states = versions
    family = make_family(tmp_path / "fam", folder, states)
    files = [folder / "v10.safetensors", folder / "v11.safetensors"]
    # three writers re-adding one member (alternating versions), and a fourth killed midway
    jobs = [job("none", family.root, folder, 6, *files[i % 2 :], *files[: i % 2]) for i in range(3)]
    writers = Writers([*jobs, job("none", family.root, folder, 10_000, *files)])
    seen, retryable, reads = set(), 0, 0
    deadline = time.monotonic() + 60
    while writers.alive() and time.monotonic() < deadline:
        forget_verified()  # every read checks the bytes again, like a new process would
        try:
            seen.add(which_version(family, states))
        except MemberChangedError:
            retryable += 1
        reads += 1
        if reads == 3:
            os.kill(writers.pids[-1], signal.SIGKILL)  # killed at whatever point it was in
        if reads == 3 or reads > 40:
            time.sleep(0.01)
    if reads < 3:
        os.kill(writers.pids[-1], signal.SIGKILL)
    codes, err = writers.statuses()
    assert codes == [0, 0, 0, -signal.SIGKILL], err
    assert reads >= 3 and seen <= {10, 11} and retryable < reads
    family.add_model("m", states[10], files_from=folder)
    assert leftovers(family) == []
    assert which_version(family, states) == 10
    assert family.members() == ["m", "other"]
    shutil.rmtree(family.root)
