"""Distributed deduplication with Accelerate: data-parallel validation and group-parallel planning.

Launch the same program on every process (``torchrun``, ``accelerate launch``); every process
loads the same members and data and calls :func:`deduplicate_family_distributed`:

* **teams**: the processes are split into contiguous teams, one per model group (architecture and
  training data) as far as there are processes (``parallel="auto"``); ``"data"`` makes one team of
  all processes, ``"groups"`` one team per process. Groups go to teams round robin.
* **data-parallel validation** inside a team: every process holds the target (or its shard under a
  device map) and applies the same replacements; each scores a contiguous shard of the validation
  batches and the per-batch sums are added (exact: integers on private data, one non-zero float
  per batch on public data, summed in batch order — bit-identical to one process). On private
  data the main process alone draws the SVT / Laplace noise and broadcasts the answer, so the
  mechanisms and the ledger are those of the single-process run.
* **group-parallel planning**: teams search different groups at once; each team's main process
  sends its accepted replacements and reports to the global main process, which re-applies them to
  its own copies and writes the one store in the single-process order.
* **all or nothing**: the main process builds the store in a hidden staging folder next to
  ``out`` and renames it only after every process has finished; a process that dies or stops
  answering makes every other one raise :class:`~hf_dpdedup.errors.PeerFailureError` (collectives
  have timeouts) and the staging folder is removed. Only the main process writes.

Launch examples are in ``docs/distributed.md``.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from .adapters import is_adapter_folder, load_adapter_folder
from .dedup.live import Decision
from .dedup.planner import (
    DedupConfig,
    DedupData,
    Member,
    Outcome,
    search_family,
)
from .dedup.storing import deduplicate_family, save_outcomes
from .dedup.report import FamilyReport
from .errors import DistributedDedupError, PeerFailureError
from .collective import SINGLE_PROCESS, Collective, collective_scope, shard_range

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 3600.0  # a collective waits this long for a live but slow peer (dead peers fail at once on gloo)
PARALLEL_MODES = ("auto", "data", "groups")


# --- processes -------------------------------------------------------------------------------------
def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_state(*, cpu: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Accelerate's process state (initialises torch.distributed with ``timeout_s`` on collectives)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))


class ProcessCollective:
    """A team of processes as a :class:`~hf_dpdedup.privacy.private_data.Collective`."""

    def __init__(self, ranks: list[int], group: Any, device: torch.device, timeout_s: float) -> None:
        import torch.distributed as dist

        self.ranks, self.group, self.device, self.timeout_s = ranks, group, device, timeout_s
        self.rank, self.size = ranks.index(dist.get_rank()), len(ranks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list) -> list:
        import torch.distributed as dist

        dtype = torch.int64 if all(isinstance(v, int) for v in values) else torch.float64
        tensor = torch.tensor(values, dtype=dtype, device=self.device)
        with peer_failures("adding validation sums", self.timeout_s):
            dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def from_main(self, compute: Callable[[], T]) -> T:
        import torch.distributed as dist

        box = [compute() if self.is_main else None]
        with peer_failures("receiving the main process' answer", self.timeout_s):
            dist.broadcast_object_list(box, src=self.ranks[0], group=self.group)
        return box[0]


@contextmanager
def peer_failures(what: str, timeout_s: float) -> Iterator[None]:
    """Turn a collective's failure (dead peer, timeout) into a :class:`PeerFailureError`."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistBackendError and gloo/NCCL errors
        if isinstance(exc, DistributedDedupError):
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PeerFailureError(
            f"{what} failed on process {_global_rank()}: another process died or did not answer within "
            f"{timeout_s:g} s ({type(exc).__name__}: {first_line}). The run is aborted and no store is "
            "written; see the failed process' log (torchrun names its rank), fix it and run again."
        ) from None


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def team_ranks(n_groups: int, world_size: int, parallel: str = "auto") -> list[list[int]]:
    """Contiguous teams of ranks: ``auto`` one per group as far as processes go, ``data`` one team
    of every process, ``groups`` one team per process."""
    if parallel not in PARALLEL_MODES:
        raise DistributedDedupError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}.")
    n_teams = {"auto": max(1, min(n_groups, world_size)), "data": 1, "groups": world_size}[parallel]
    return [list(shard_range(world_size, t, n_teams)) for t in range(n_teams)]


def _team_collective(teams: list[list[int]], device: torch.device, timeout_s: float) -> Collective:
    """This process' team; every process creates every team's group, in the same order (as
    torch.distributed requires)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine: Collective = SINGLE_PROCESS
    for ranks in teams:
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s)) if 1 < len(ranks) < world else None
        if rank in ranks and len(ranks) > 1:
            mine = ProcessCollective(ranks, group, device, timeout_s)
    return mine


# --- the run ---------------------------------------------------------------------------------------
@dataclass
class _Sent:
    """What a team's main process sends to the global main: enough to rebuild and store a member."""

    name: str
    report: Any  # ModelReport without its model
    decisions: list[Decision]  # (block, "base" | "self", source block) of each kept replacement


def deduplicate_family_distributed(
    members: list[Member],
    data: DedupData,
    config: DedupConfig,
    out: str | Path,
    *,
    parallel: str = "auto",
    cpu: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    state: Any = None,
) -> FamilyReport | None:
    """:func:`~hf_dpdedup.dedup.storing.deduplicate_family` across the launched processes.

    Call it on every process with the same members, data and config. Returns the report on the
    main process and ``None`` on the others. With one process it is ``deduplicate_family``. The
    family loop is the planner's (:func:`~hf_dpdedup.dedup.planner.search_family`); this module is
    the executor that runs its groups on teams of processes (:class:`TeamExecutor`).

    >>> # torchrun --nproc_per_node 2 my_dedup.py  (my_dedup.py calls this on every process)
    >>> report = deduplicate_family_distributed(members, data, config, "family")  # doctest: +SKIP
    """
    state = state if state is not None else init_state(cpu=cpu, timeout_s=timeout_s)
    if state.num_processes == 1:
        return deduplicate_family(members, data, config, out)
    executor = TeamExecutor(state, _parallel_mode(parallel, data), timeout_s)
    for m in members:
        place_member(m, state.device)
    data = data_on_device(data, state.device)
    with _signals_as_errors() as run:
        try:
            outcomes = search_family(members, data, config, executor=executor)
            if state.process_index != 0:
                for _ in outcomes:  # runs this process' team and sends its results; yields nothing here
                    pass
                _barrier("finishing", timeout_s)
                return None
            extra = {"processes": state.num_processes, "teams": lambda: executor.n_teams}
            # every process is alive and done before the store appears
            return save_outcomes(outcomes, out, config, report_extra=extra,
                                 before_publish=lambda: _barrier("finishing", timeout_s))
        except BaseException as exc:
            run.failing = True  # a launcher's SIGTERM must not interrupt the cleanup
            # Said at once: the launcher may stop this process before the caller prints anything.
            print(f"hf_dpdedup: process {state.process_index} aborts the distributed dedup: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise


class TeamExecutor:
    """Runs the family loop's groups on teams of processes (round robin) and hands the outcomes to
    the main process in the single-process order; other processes get none. A team's main process
    sends each outcome as decisions (:class:`_Sent`); the global main re-applies the decisions of
    other teams' groups to its own copies of the members when it stores them."""

    def __init__(self, state: Any, parallel: str, timeout_s: float) -> None:
        self.state, self.parallel, self.timeout_s = state, parallel, timeout_s
        self.n_teams = 0

    def __call__(self, groups: list[list[Member]],
                 search: Callable[[list[Member]], Iterator[Outcome]]) -> Iterator[Outcome]:
        teams = team_ranks(len(groups), self.state.num_processes, self.parallel)
        self.n_teams = len(teams)
        collective = _team_collective(teams, self.state.device, self.timeout_s)
        rank = self.state.process_index
        my_team = next(t for t, ranks in enumerate(teams) if rank in ranks)
        sent: dict[int, list[_Sent]] = {}
        for g, group in enumerate(groups):
            if g % len(teams) != my_team:
                continue
            with collective_scope(collective):
                outcomes = list(search(group))  # the whole group inside the team's scope
            if collective.is_main:
                sent[g] = [_to_sent(o) for o in outcomes]
        received = _gather_to_main(sent, self.timeout_s)
        if received is None:
            return
        by_name = {m.name: m for group in groups for m in group}
        for g in range(len(groups)):
            applied = g % len(teams) == my_team  # this process' own team edited its models already
            for item in received[g]:
                yield _rebuild(item, by_name, applied=applied)


def _parallel_mode(parallel: str, data: DedupData) -> str:
    """Private validation keeps every group on every process: the private data set's charges and
    budget (``epsilon_budget``) must see every mechanism, in the single-process order."""
    if data.private_val is None or parallel == "data":
        return parallel
    if parallel == "groups":
        raise DistributedDedupError(
            "parallel='groups' cannot be used with private validation: every group charges the same private "
            "data set, whose budget must see all of them in order. Use parallel='data' (or 'auto')."
        )
    return "data"


def _to_sent(outcome: Outcome) -> _Sent:
    report = copy.copy(outcome.report)
    report.model = report.val_scores = report.val_scores_before = report.test_scores_before = None
    return _Sent(outcome.member.name, report, list(outcome.decisions))


def _rebuild(item: _Sent, by_name: dict[str, Member], *, applied: bool) -> Outcome:
    """The outcome on the main process: its own copy of the member; decisions not applied yet unless
    its own team searched (and so edited) it."""
    return Outcome(by_name[item.name], copy.copy(item.report), decisions=item.decisions,
                   applied=applied or not item.decisions)


def _gather_to_main(sent: dict[int, list[_Sent]], timeout_s: float) -> dict[int, list[_Sent]] | None:
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    with peer_failures("gathering the groups' results", timeout_s):
        dist.gather_object(sent, gathered, dst=0)
    if gathered is None:
        return None
    merged: dict[int, list[_Sent]] = {}
    for part in gathered:
        merged.update(part)
    return merged


def _barrier(what: str, timeout_s: float) -> None:
    import torch.distributed as dist

    with peer_failures(what, timeout_s):
        dist.barrier()


class _RunState:
    failing = False


@contextmanager
def _signals_as_errors() -> Iterator[_RunState]:
    """SIGTERM (what launchers send the survivors when one process fails) raises, so cleanup runs;
    once the run is failing, further SIGTERMs are ignored until the cleanup is done."""
    run = _RunState()
    if threading.current_thread() is not threading.main_thread():
        yield run
        return

    def handler(signum: int, frame: Any) -> None:
        if run.failing:
            return
        raise PeerFailureError(
            f"Process {_global_rank()} was stopped by {signal.Signals(signum).name}: the launcher stops every "
            "process when one fails. No store is written; see the failed process' log."
        )

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield run
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- devices and big models --------------------------------------------------------------------------
def place_member(member: Member, device: torch.device) -> None:
    """Move a member to this process' device, unless it is already spread by a device map."""
    model = member.model
    if getattr(model, "hf_device_map", None):
        check_materialised(member.name, model)
    elif device.type != "cpu":
        model.to(device)


def check_materialised(name: str, model: torch.nn.Module) -> None:
    """In-place block edits need real tensors: refuse parameters offloaded to CPU/disk (meta)."""
    offloaded = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if offloaded:
        raise DistributedDedupError(
            f"Member {name!r} has {len(offloaded)} offloaded (meta) tensors, e.g. {offloaded[0]!r}; blocks are "
            "edited in place, so every weight must live on a device. Give the process more GPUs or memory "
            "(max_memory), or run fewer processes per machine."
        )


def data_on_device(data: DedupData, device: torch.device) -> DedupData:
    """Scores and calibration on the model's device (a no-op on CPU)."""
    if device.type == "cpu":
        return data
    from accelerate.utils import send_to_device

    def on_model_device(fn: Callable[[Any, Any], Any] | None) -> Callable[[Any, Any], Any] | None:
        if fn is None:
            return None
        return lambda model, batch: fn(model, send_to_device(batch, next(model.parameters()).device))

    calibration = send_to_device(data.calibration, device) if data.calibration is not None else None
    changes = {"score_fn": on_model_device(data.score_fn), "calibration": calibration}
    if getattr(data, "predict_fn", None) is not None:
        changes["predict_fn"] = on_model_device(data.predict_fn)
    return replace(data, **changes)


def process_max_memory(fraction: float = 0.9) -> dict[Any, int] | None:
    """This process' share of the machine's GPUs for a device map (``None`` without GPUs).

    With L processes on a machine of G GPUs, local process r gets GPUs [r·G/L, (r+1)·G/L): each
    process spreads its copy of a member over its own GPUs only.
    """
    if not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    mine = shard_range(torch.cuda.device_count(), local_rank, local_size)
    if not mine:
        raise DistributedDedupError(
            f"{local_size} processes on this machine but only {torch.cuda.device_count()} GPUs: "
            "start at most one process per GPU."
        )
    return {i: int(torch.cuda.get_device_properties(i).total_memory * fraction) for i in mine}


def load_member_model(folder: str | Path, *, device_map: str | None = None) -> torch.nn.Module:
    """A member folder as a model: a transformers folder as its ``config.architectures[0]`` class, a
    peft adapter folder (``adapter_config.json``) as a ``PeftModel`` on its base (see
    :func:`hf_dpdedup.adapters.load_adapter_folder`). With ``device_map`` it is built under
    ``init_empty_weights`` and dispatched over this process' GPUs (Accelerate's big-model loading)."""
    import transformers

    if is_adapter_folder(folder):
        if device_map is None:
            return load_adapter_folder(folder)
        model = load_adapter_folder(folder, device_map=device_map, max_memory=process_max_memory())
        check_materialised(Path(folder).name, model)
        return model
    config = transformers.AutoConfig.from_pretrained(folder)
    klass = getattr(transformers, (config.architectures or ["AutoModelForSequenceClassification"])[0])
    if device_map is None:
        return klass.from_pretrained(folder).eval()
    model = klass.from_pretrained(folder, device_map=device_map, max_memory=process_max_memory())
    check_materialised(Path(folder).name, model)
    return model.eval()
