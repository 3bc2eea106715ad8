"""DedupConfig: typed fields, exact round trips, the deprecated keyword forms, the CLI's defaults."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_dpdedup
from hf_dpdedup.cli import build_parser
from hf_dpdedup.cli.dedup import PYTHON_ONLY, config_from_args
from hf_dpdedup.dedup import saliency, search, similarity
from hf_dpdedup.dedup.config import (
    CONFIG_VERSION,
    MCTS,
    STRATEGIES,
    SVT,
    VALIDATIONS,
    Binary,
    DedupConfig,
    Gallop,
    Greedy,
    Halving,
    NaiveLaplace,
    PlanConfig,
    Public,
)
from hf_dpdedup.dedup.cost import CostMeasure
from hf_dpdedup.dedup.planner import DedupData
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.tasks import classification_score
from hf_dpdedup.dedup.typed import choice_kinds, field_types, literal_choices
from hf_dpdedup.errors import ConfigError, StoreFormatError, UnsupportedConfigVersionError
from hf_dpdedup.privacy import PrivateDataset
from hf_dpdedup.store.family import FamilyStore

from test_dedup_engine import BLOCK, make_family

# --- generated configs round-trip exactly ----------------------------------------------------------
positive = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=1, max_value=10_000)
names = st.text(min_size=1, max_size=8)

validations = st.one_of(
    st.builds(Public),
    st.builds(SVT, epsilon=positive, cutoff=counts, floor_epsilon=positive),
    st.builds(NaiveLaplace, epsilon_per_query=positive, floor_epsilon=positive),
)
search_strategies = st.one_of(
    st.builds(Gallop, min_group=counts, max_validations=counts),
    st.builds(Greedy, n=counts),
    st.builds(Binary, min_group=counts),
    st.builds(Halving, min_group=counts),
    st.builds(MCTS, group=counts, episodes=counts, seed=st.integers(-10, 2**31)),
)


def literal(cls, name):
    return st.sampled_from(literal_choices(cls, name))


plans = st.builds(
    PlanConfig, candidates=literal(PlanConfig, "candidates"), order=literal(PlanConfig, "order"),
    cost=literal(PlanConfig, "cost"), saliency=literal(PlanConfig, "saliency"),
    aggregate=literal(PlanConfig, "aggregate"), metric=literal(PlanConfig, "metric"), top_k=counts,
    use_self=st.booleans(), close_ratio=st.none() | st.floats(0, 1), method=literal(PlanConfig, "method"),
    fisher_micro_batch=st.none() | counts, fisher_max_examples=st.none() | counts,
    only_tensors=st.none() | st.frozensets(names, max_size=4),
)


@st.composite
def configs(draw):
    agreement = draw(st.booleans())
    interactive = draw(st.sampled_from([None, False] if agreement else [None, False, True]))
    margin, widen = draw(st.floats(0, 10)), draw(st.booleans())  # the confirmation's margin or the drop bound
    return DedupConfig(
        block_size=draw(st.integers(1, 2**24)), threshold=draw(st.floats(0, 1)),
        strategy=draw(search_strategies), plan=draw(plans), validation=draw(validations),
        interactive=interactive, agreement=agreement, confirm_margin_se=margin if widen else 0.0,
        floor_margin_se=draw(st.floats(0, 10)), drop_bound_se=0.0 if widen else margin,
        confirmation=draw(literal(DedupConfig, "confirmation")), base=draw(st.none() | names),
        noise_seed=draw(st.none() | st.integers(0, 2**63)),
        overlaps=tuple(draw(st.lists(st.tuples(names, names), max_size=3))),
        fairness=draw(literal(DedupConfig, "fairness")),
    )


@settings(max_examples=200, deadline=None)
@given(configs())
def test_from_dict_inverts_to_dict_exactly_through_json(config):
    data = config.to_dict()
    assert data["version"] == CONFIG_VERSION
    assert DedupConfig.from_dict(data) == config
    assert DedupConfig.from_dict(json.loads(json.dumps(data))) == config
    assert DedupConfig.from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_to_dict_names_every_field_and_tags_choices_by_kind():
    config = DedupConfig(validation=SVT(epsilon=1.0, cutoff=3), strategy=Greedy(n=7),
                         plan=PlanConfig(only_tensors={"b", "a"}), overlaps=(("x", "y"),))
    data = config.to_dict()
    assert set(data) == {"version", *(f.name for f in dataclasses.fields(DedupConfig))}
    assert data["validation"] == {"kind": "svt", "epsilon": 1.0, "cutoff": 3, "floor_epsilon": 0.1}
    assert data["strategy"] == {"kind": "greedy", "n": 7}
    assert data["plan"]["only_tensors"] == ["a", "b"] and data["overlaps"] == [["x", "y"]]
    assert set(data["plan"]) == {f.name for f in dataclasses.fields(PlanConfig)}


# --- typed errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: SVT(epsilon=-1.0), "SVT.epsilon must be > 0"),
    (lambda: SVT(cutoff=0), "SVT.cutoff must be ≥ 1"),
    (lambda: NaiveLaplace(epsilon_per_query=0.0), "epsilon_per_query must be > 0"),
    (lambda: SVT(epsilon=math.inf), "SVT.epsilon takes float"),
    (lambda: Greedy(n=0), "Greedy.n must be ≥ 1"),
    (lambda: Gallop(min_group=2.5), "Gallop.min_group takes int"),
    (lambda: DedupConfig(block_size="65536"), "DedupConfig.block_size takes int"),
    (lambda: DedupConfig(block_size=0), "block_size must be ≥ 1"),
    (lambda: DedupConfig(threshold=True), "DedupConfig.threshold takes float"),
    (lambda: DedupConfig(threshold=1.5), r"threshold is an allowed utility drop in \[0, 1\]"),
    (lambda: DedupConfig(threshold=math.nan), "DedupConfig.threshold takes float"),
    (lambda: DedupConfig(fairness="filter"), "DedupConfig.fairness takes 'flag' | 'drop' | 'off'"),
    (lambda: DedupConfig(confirmation="suffix"), "confirmation takes 'prefix' | 'gallop'"),
    (lambda: DedupConfig(validation=Greedy()), "DedupConfig.validation takes Public | SVT | NaiveLaplace"),
    (lambda: DedupConfig(strategy=SVT()), "DedupConfig.strategy takes Gallop"),
    (lambda: DedupConfig(overlaps=(("a",),)), "DedupConfig.overlaps takes"),
    (lambda: DedupConfig(confirm_margin_se=-1.0), "confirm_margin_se must be ≥ 0"),
    (lambda: DedupConfig(floor_margin_se=-0.5), "floor_margin_se must be ≥ 0"),
    (lambda: DedupConfig(drop_bound_se=-1.0), "drop_bound_se must be ≥ 0"),
    (lambda: DedupConfig(drop_bound_se=1.0, confirm_margin_se=1.0), "set one of them to 0"),
    (lambda: DedupConfig(agreement=True, interactive=True), "use interactive=False"),
    (lambda: PlanConfig(cost="l0"), "PlanConfig.cost takes 'taylor' | 'fisher' | 'wanda' | 'delta'"),
    (lambda: PlanConfig(close_ratio=2.0), r"close_ratio must be in \[0, 1\]"),
    (lambda: PlanConfig(top_k=0), "top_k must be ≥ 1"),
    (lambda: PlanConfig(fisher_max_examples=0), "fisher_max_examples must be ≥ 1 or None"),
])
def test_bad_values_raise_typed_errors_that_say_what_the_field_takes(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize("edit, error, match", [
    (lambda d: d["validation"].update(kind="magic"), ConfigError, r"unknown kind 'magic'; use one of \['naive', 'public', 'svt'\]"),
    (lambda d: d["strategy"].update(kind="annealing"), ConfigError, r"DedupConfig.strategy: unknown kind 'annealing'"),
    (lambda d: d["validation"].update(epsilon=-2.0), ConfigError, "SVT.epsilon must be > 0"),
    (lambda d: d["strategy"].update(m=3), ConfigError, r"DedupConfig.strategy\[greedy\] has no field\(s\) \['m'\]"),
    (lambda d: d.update(svt_epsilon=1.0), ConfigError, r"DedupConfig has no field\(s\) \['svt_epsilon'\]"),
    (lambda d: d["plan"].update(order="random"), ConfigError, "PlanConfig.order takes"),
    (lambda d: d.update(version=CONFIG_VERSION + 1), UnsupportedConfigVersionError, "upgrade hf_dpdedup"),
    (lambda d: d.pop("version"), ConfigError, "needs an integer 'version'"),
    (lambda d: d.update(plan=[1, 2]), ConfigError, "DedupConfig.plan takes PlanConfig"),
])
def test_from_dict_refuses_what_to_dict_never_writes(edit, error, match):
    data = DedupConfig(validation=SVT(), strategy=Greedy()).to_dict()
    edit(data)
    with pytest.raises(error, match=match):
        DedupConfig.from_dict(data)


def test_interactive_defaults_to_not_agreement():
    assert DedupConfig().interactive is True
    assert DedupConfig(agreement=True).interactive is False
    assert DedupConfig(agreement=True, interactive=False) == DedupConfig(agreement=True)
    assert dataclasses.replace(DedupConfig(), threshold=0.1).threshold == 0.1


def test_strategy_options_match_the_search_functions():
    """Every strategy dataclass has exactly its search function's keywords, with the same defaults."""
    assert set(STRATEGIES) == set(search.STRATEGIES)
    for kind, cls in STRATEGIES.items():
        params = {name: p.default for name, p in inspect.signature(search.STRATEGIES[kind]).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert cls().options() == params, kind


def test_plan_literals_are_what_the_engine_implements():
    assert literal_choices(PlanConfig, "saliency") == saliency.MEASURES
    assert literal_choices(PlanConfig, "aggregate") == saliency.AGGREGATES
    assert literal_choices(PlanConfig, "metric") == similarity.METRICS
    assert literal_choices(PlanConfig, "cost") == CostMeasure.__args__


def test_the_config_is_exported_where_users_look():
    from hf_dpdedup.dedup import planner

    assert hf_dpdedup.DedupConfig is planner.DedupConfig is DedupConfig
    assert hf_dpdedup.SVT is SVT and hf_dpdedup.Greedy is Greedy and hf_dpdedup.PlanConfig is PlanConfig


# --- the deprecated keyword forms ------------------------------------------------------------------
@pytest.mark.parametrize("old, new", [
    (dict(validation="svt", svt_epsilon=2.0, svt_cutoff=5, naive_epsilon=0.3), dict(validation=SVT(epsilon=2.0, cutoff=5))),
    (dict(validation="naive", svt_epsilon=2.0, naive_epsilon=0.3, floor_epsilon=0.2),
     dict(validation=NaiveLaplace(epsilon_per_query=0.3, floor_epsilon=0.2))),
    (dict(validation="public", svt_epsilon=2.0), dict(validation=Public())),
    (dict(validation="svt"), dict(validation=SVT())),
    (dict(strategy="greedy", strategy_options={"n": 3}), dict(strategy=Greedy(n=3))),
    (dict(strategy="mcts", strategy_options={"group": 5, "episodes": 7}), dict(strategy=MCTS(group=5, episodes=7))),
    (dict(strategy="binary"), dict(strategy=Binary())),
    (dict(strategy_options={"max_validations": 10}), dict(strategy=Gallop(max_validations=10))),
    (dict(svt_epsilon=3.0, validation=SVT(cutoff=2)), dict(validation=SVT(epsilon=3.0, cutoff=2))),
])
def test_old_keywords_build_the_same_config_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert DedupConfig(**old) == DedupConfig(**new)


def test_new_forms_warn_nothing_and_old_errors_stay_typed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DedupConfig(validation=SVT(), strategy=Greedy(n=3))
    with pytest.raises(ConfigError, match="Unknown validation 'laplace'"):
        DedupConfig(validation="laplace")
    with pytest.raises(ConfigError, match="Unknown strategy 'anneal'"):
        DedupConfig(strategy="anneal")
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match=r"takes the options \['n'\], not \['m'\]"):
        DedupConfig(strategy="greedy", strategy_options={"m": 1})
    assert "svt_epsilon" not in {f.name for f in dataclasses.fields(DedupConfig)}  # converted, not stored


def private_data(batches):
    rows = {"input_ids": torch.cat([b["input_ids"] for b in batches[:3]]),
            "labels": torch.cat([b["labels"] for b in batches[:3]])}
    private = PrivateDataset(rows, dataset_id="toy-train", public_size=300, batch_size=100)
    return DedupData(classification_score, public_val=batches[3:4], public_test=batches[4:], private_val=private)


def stored(root):
    family = FamilyStore.open(root)
    return ({name: (c.tensors, c.privacy, c.dedup) for name in family.members() for c in [family.constitution(name)]},
            family.blocks.index.total_rows)


def test_old_and_new_forms_give_identical_reports_ledgers_and_plans(tmp_path):
    """The tiny family of test_dedup_engine, private SVT validation with seeded noise and a greedy search."""
    new = DedupConfig(block_size=BLOCK, threshold=0.03, strategy=Greedy(n=4), validation=SVT(epsilon=1.0, cutoff=3),
                      noise_seed=7)
    with pytest.warns(DeprecationWarning):
        old = DedupConfig(block_size=BLOCK, threshold=0.03, strategy="greedy", strategy_options={"n": 4},
                          validation="svt", svt_epsilon=1.0, svt_cutoff=3, naive_epsilon=0.1, noise_seed=7)
    reports = {}
    for name, config in (("new", new), ("old", old)):
        members, batches = make_family()
        reports[name] = deduplicate_family(members, private_data(batches), config, tmp_path / name)
    first, second = reports["new"], reports["old"]
    assert first.to_dict() == second.to_dict()  # config, summary, every model's report (ledger included)
    assert [m.ledger.epsilon for m in first.targets] == [m.ledger.epsilon for m in second.targets]
    assert any(m.from_base + m.from_self > 0 for m in first.targets)
    assert stored(tmp_path / "new") == stored(tmp_path / "old")  # the same rows, privacy, records
    # the store remembers how it was made
    assert DedupConfig.from_family(tmp_path / "new") == new == DedupConfig.from_family(tmp_path / "old")
    assert first.to_dict()["config"] == new.to_dict()


# --- the family's dedup_config.json ----------------------------------------------------------------
def test_a_family_without_a_config_says_so_and_a_damaged_one_is_a_typed_error(tmp_path):
    family = FamilyStore.create(tmp_path / "f", block_size=16)
    assert family.read_config() is None
    with pytest.raises(ConfigError, match="no dedup_config.json"):
        DedupConfig.from_family(tmp_path / "f")
    family.write_config(DedupConfig(strategy=Halving(min_group=2)).to_dict())
    assert DedupConfig.from_family(tmp_path / "f") == DedupConfig(strategy=Halving(min_group=2))
    recoded = family.recode(tmp_path / "g", codec="none")
    assert recoded.read_config() == family.read_config()
    (tmp_path / "f" / "dedup_config.json").write_text("{not json")
    with pytest.raises(StoreFormatError, match="delete it"):
        family.read_config()


# --- the CLI: defaults are the dataclasses', every field has a flag --------------------------------
def parse(*flags):
    return config_from_args(build_parser().parse_args(["dedup", "m", "--out", "o", "--val", "v", *flags]))


def test_cli_defaults_are_the_dataclass_defaults():
    assert parse() == DedupConfig()
    for kind, cls in STRATEGIES.items():
        assert parse("--strategy", kind) == DedupConfig(strategy=cls()), kind
    for kind, cls in VALIDATIONS.items():
        assert parse("--validation", kind) == DedupConfig(validation=cls()), kind
    assert parse("--agreement") == DedupConfig(agreement=True)  # interactive follows, as in Python


# (flags, field path, value): paths name a choice's kind in brackets
CLI_EXAMPLES = [
    (["--block-size", "4096"], "block_size", 4096),
    (["--threshold", "0.05"], "threshold", 0.05),
    (["--base", "eps1"], "base", "eps1"),
    (["--validation", "public"], "validation[public]", Public()),
    (["--validation", "svt"], "validation[svt]", SVT()),
    (["--validation", "naive"], "validation[naive]", NaiveLaplace()),
    (["--validation", "svt", "--svt-epsilon", "2"], "validation[svt].epsilon", 2.0),
    (["--validation", "svt", "--svt-cutoff", "5"], "validation[svt].cutoff", 5),
    (["--validation", "svt", "--floor-epsilon", "0.5"], "validation[svt].floor_epsilon", 0.5),
    (["--validation", "naive", "--naive-epsilon", "0.2"], "validation[naive].epsilon_per_query", 0.2),
    (["--validation", "naive", "--floor-epsilon", "0.5"], "validation[naive].floor_epsilon", 0.5),
    (["--strategy", "gallop"], "strategy[gallop]", Gallop()),
    (["--strategy", "greedy"], "strategy[greedy]", Greedy()),
    (["--strategy", "binary"], "strategy[binary]", Binary()),
    (["--strategy", "halving"], "strategy[halving]", Halving()),
    (["--strategy", "mcts"], "strategy[mcts]", MCTS()),
    (["--strategy", "gallop", "--min-group", "2"], "strategy[gallop].min_group", 2),
    (["--strategy", "gallop", "--max-validations", "9"], "strategy[gallop].max_validations", 9),
    (["--strategy", "greedy", "--greedy-n", "3"], "strategy[greedy].n", 3),
    (["--strategy", "binary", "--min-group", "2"], "strategy[binary].min_group", 2),
    (["--strategy", "halving", "--min-group", "2"], "strategy[halving].min_group", 2),
    (["--strategy", "mcts", "--mcts-group", "5"], "strategy[mcts].group", 5),
    (["--strategy", "mcts", "--mcts-episodes", "6"], "strategy[mcts].episodes", 6),
    (["--strategy", "mcts", "--mcts-seed", "3"], "strategy[mcts].seed", 3),
    (["--candidates", "nearest"], "plan.candidates", "nearest"),
    (["--order", "saliency"], "plan.order", "saliency"),
    (["--cost", "wanda"], "plan.cost", "wanda"),
    (["--saliency", "gradient"], "plan.saliency", "gradient"),
    (["--aggregate", "l2"], "plan.aggregate", "l2"),
    (["--metric", "cosine"], "plan.metric", "cosine"),
    (["--top-k", "8"], "plan.top_k", 8),
    (["--aligned-only"], "plan.use_self", False),
    (["--close-ratio", "none"], "plan.close_ratio", None),
    (["--similarity-method", "sketch"], "plan.method", "sketch"),
    (["--fisher-micro-batch", "4"], "plan.fisher_micro_batch", 4),
    (["--fisher-max-examples", "none"], "plan.fisher_max_examples", None),
    (["--only-tensor", "a", "--only-tensor", "b"], "plan.only_tensors", frozenset({"a", "b"})),
    (["--no-interactive"], "interactive", False),
    (["--agreement"], "agreement", True),
    (["--confirm-margin-se", "1.5"], "confirm_margin_se", 1.5),
    (["--floor-margin-se", "0"], "floor_margin_se", 0.0),
    (["--drop-bound-se", "1"], "drop_bound_se", 1.0),
    (["--confirmation", "gallop"], "confirmation", "gallop"),
    (["--fairness", "drop"], "fairness", "drop"),
    (["--overlap", "a", "b"], "overlaps", (("a", "b"),)),
]


def config_paths() -> set[str]:
    """Every field of DedupConfig, nested, with each kind of a choice and each kind's fields."""
    paths = set()
    for name, hint in field_types(DedupConfig).items():
        kinds = choice_kinds(DedupConfig, name)
        if kinds:
            for kind, cls in kinds.items():
                paths |= {f"{name}[{kind}]", *(f"{name}[{kind}].{f.name}" for f in dataclasses.fields(cls))}
        elif dataclasses.is_dataclass(hint):
            paths |= {f"{name}.{f.name}" for f in dataclasses.fields(hint)}
        else:
            paths.add(name)
    return paths


def at(config, path):
    head, _, rest = path.partition(".")
    name, _, kind = head.partition("[")
    value = getattr(config, name)
    if kind:
        assert value.kind == kind.rstrip("]"), path
    return getattr(value, rest) if rest else value


@pytest.mark.parametrize("flags, path, value", CLI_EXAMPLES, ids=[p for _, p, _ in CLI_EXAMPLES])
def test_each_flag_sets_its_field(flags, path, value):
    assert at(parse(*flags), path) == value
    if "[" not in path or "]." in path:  # an option: the flag changes it from the default
        kind_flags = flags[:2] if "]." in path else []
        assert at(parse(*kind_flags), path) != value


def test_every_config_field_is_reachable_from_the_cli_or_named_python_only():
    covered = {path for _, path, _ in CLI_EXAMPLES}
    assert config_paths() - covered == set(PYTHON_ONLY)
    assert covered <= config_paths()


def test_a_config_written_before_the_paired_floor_reads_as_the_exact_floor_it_ran_with():
    old = {k: v for k, v in DedupConfig().to_dict().items() if k != "floor_margin_se"}
    assert DedupConfig.from_dict(old).floor_margin_se == 0.0
    assert DedupConfig().floor_margin_se == 1.0  # new runs: the paired floor
