"""The distribution seam without processes: shards, teams, and mechanisms run by two threads that
stand in for two processes (each thread has its own collective scope, data set copy and sampler)."""

from __future__ import annotations

import threading

import pytest
import torch

from hf_dpdedup.dedup.live import LiveBlocks
from hf_dpdedup.dedup.validate import public_utility
from hf_dpdedup.dedup.live import apply_decisions
from hf_dpdedup.distributed import check_materialised, team_ranks
from hf_dpdedup.errors import DistributedDedupError
from hf_dpdedup.privacy import LaplaceSampler, NaiveLaplaceValidator, PrivateDataset, SVTSession, release_utility
from hf_dpdedup.collective import collective_scope, shard_range


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_partition_the_items_exactly_once_and_contiguously(n, size):
    shards = [shard_range(n, r, size) for r in range(size)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_teams():
    assert team_ranks(1, 4) == [[0, 1, 2, 3]]  # one group: every process validates it
    assert team_ranks(2, 4) == [[0, 1], [2, 3]]
    assert team_ranks(5, 2) == [[0], [1]]
    assert team_ranks(3, 2, "data") == [[0, 1]]
    assert team_ranks(1, 3, "groups") == [[0], [1], [2]]
    with pytest.raises(DistributedDedupError):
        team_ranks(1, 2, "model")


class ThreadTeam:
    """An in-memory Collective for threads: what torch.distributed does for processes."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier = size, threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size

    def member(self, rank: int):
        team = self

        class Member:
            is_main = rank == 0

            def __init__(self):
                self.rank, self.size = rank, team.size

            def sum(self, values):
                team.slots[rank] = list(values)
                team.barrier.wait()
                total = [sum(column) for column in zip(*team.slots)]
                team.barrier.wait()
                return total

            def from_main(self, compute):
                if rank == 0:
                    team.value = compute()
                team.barrier.wait()
                value = team.value
                team.barrier.wait()
                return value

        return Member()


class NoNoise(LaplaceSampler):
    """The sampler of a non-main process: drawing from it fails the test."""

    def __init__(self) -> None:
        super().__init__(None, seeded=True)

    def discrete_laplace(self, scale):
        raise AssertionError("a non-main process drew noise")


def run_threads(size: int, body):
    team, results, errors = ThreadTeam(size), [None] * size, []

    def target(rank):
        try:
            with collective_scope(team.member(rank)):
                results[rank] = body(rank)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            team.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


ROWS = 300  # batches of 64: five, the last one of 44


def private_copy(seen: list | None = None):
    x = torch.arange(ROWS, dtype=torch.float32)
    return PrivateDataset({"x": x}, dataset_id="toy", public_size=ROWS, batch_size=64)


def scorer(seen: list):
    def score(model, batch):
        seen.extend(batch["x"].long().tolist())
        return ((batch["x"] * 0.37) % 1.0 < model.weight.item()).float()  # utility ≈ the weight
    return score


def model(w: float):
    m = torch.nn.Linear(1, 1, bias=False)
    m.weight.data.fill_(w)
    return m


CANDIDATES = [0.55, 0.2, 0.6, 0.1, 0.7, 0.52, 0.3]


def svt_answers(rank: int | None, seen: list):
    sampler = LaplaceSampler.seeded_for_tests(3) if rank in (None, 0) else NoNoise()
    ds = private_copy()
    session = SVTSession(ds, reference=model(0.5), score_fn=scorer(seen), epsilon=2.0, cutoff=3, allowed_drop=0.01,
                         floor=0.2, sampler=sampler, label="svt-t")
    answers = [session.accepts(model(w)) for w in CANDIDATES if not session.halted]
    return answers, session.charge, ds.charges, ds.charged_reads, ds.raw_accesses


def test_svt_across_two_processes_answers_and_charges_as_one_with_noise_on_the_main_only():
    seen_single: list = []
    single = svt_answers(None, seen_single)
    seen = [[], []]
    both = run_threads(2, lambda r: svt_answers(r, seen[r]))
    assert both[0] == single and both[1] == single  # answers, charge, data set charges, reads, no raw access
    assert True in single[0] and False in single[0]  # the candidates test both answers
    # the shards: contiguous, the whole set exactly once per pass, the last uneven batch included
    passes = 1 + len(single[0])
    assert sorted(seen[0] + seen[1]) == sorted(seen_single) == sorted(list(range(ROWS)) * passes)
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) == set(range(192))  # batches 0-2 | 3-4


def test_naive_and_release_across_two_processes_match_one():
    def body(rank):
        sampler = LaplaceSampler.seeded_for_tests(5) if rank in (None, 0) else NoNoise()
        ds, seen = private_copy(), []
        naive = NaiveLaplaceValidator(ds, reference=model(0.5), score_fn=scorer(seen), epsilon_per_query=0.5,
                                      allowed_drop=0.02, sampler=sampler, label="naive-t")
        answers = [naive.accepts(model(w)) for w in CANDIDATES]
        sampler = LaplaceSampler.seeded_for_tests(6) if rank in (None, 0) else NoNoise()
        release = release_utility(ds, model(0.3), score_fn=scorer(seen), epsilon=1.0, sampler=sampler, label="rel")
        return answers, naive.charges, release, ds.charges

    assert run_threads(2, body) == [body(None)] * 2


def test_public_utility_is_bit_identical_across_processes():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    batches = [{"x": torch.randn(n, 4)} for n in (7, 13, 5, 11, 3)]

    def score(m, batch):
        return torch.sigmoid(m(batch["x"]))[:, 0]

    one = public_utility(net, batches, score)
    assert run_threads(2, lambda r: public_utility(net, batches, score)) == [one, one]
    assert run_threads(3, lambda r: public_utility(net, batches, score)) == [one, one, one]


def test_decisions_rebuild_the_searched_model():
    torch.manual_seed(0)
    base, target, copy = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    copy.load_state_dict(target.state_dict())
    decisions = [(0, "base", 3), (2, "self", 5), (7, "base", 0)]
    live, base_matrix = LiveBlocks(target, 4), LiveBlocks(base, 4).matrix()
    from hf_dpdedup.dedup.live import Replacement

    live.apply([Replacement(b, s, sb, base_matrix[sb] if s == "base" else live.read(sb)) for b, s, sb in decisions])
    apply_decisions(copy, base, decisions, 4)
    for k, v in target.state_dict().items():
        assert torch.equal(copy.state_dict()[k], v)


def test_offloaded_weights_are_refused():
    with torch.device("meta"):
        offloaded = torch.nn.Linear(4, 4)
    with pytest.raises(DistributedDedupError, match="offloaded"):
        check_materialised("big", offloaded)


def test_private_validation_keeps_every_group_on_every_process():
    from hf_dpdedup.dedup.planner import DedupData
    from hf_dpdedup.distributed import _parallel_mode

    private = DedupData(lambda m, b: b, public_val=[], private_val=PrivateDataset([1, 2], dataset_id="p", public_size=2))
    public = DedupData(lambda m, b: b, public_val=[])
    assert _parallel_mode("auto", private) == "data" and _parallel_mode("auto", public) == "auto"
    with pytest.raises(DistributedDedupError, match="private"):
        _parallel_mode("groups", private)
