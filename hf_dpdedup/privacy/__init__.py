"""Privacy core: model metadata, ledger (composition), Sparse Vector Technique, private-data firewall.

The engine's view, in four steps (see ``docs/privacy.md``):

1. wrap private validation data: ``PrivateDataset(examples, dataset_id=..., public_size=n)`` (n fixed in
   advance: the true size is private under the add/remove relation);
2. per target model open ``SVTSession(dataset, reference=model, score_fn=..., epsilon=..., cutoff=...,
   allowed_drop=...)`` and ask ``session.accepts(model)`` after each group of replacements;
3. release any private figure that drives a later decision with ``release_utility`` (charged);
4. compose the derived model's cost with ``account([Charge.from_metadata(...), ..., *dataset.charges])``.
"""

from ._checks import check_delta, check_epsilon
from .accounting import DEFAULT_ORDERS, epsilon_from_rdp, opacus_epsilon, rdp_of_curve, rdp_of_history, rdp_of_pure_dp
from .laplace import NaiveLaplaceValidator, NoisyRelease, naive_epsilon, release_utility
from .charge import Charge
from .ledger import account, components, compose_loose, compose_tight, distinct_charges
from .metadata import AccountantStep, PrivacyMetadata
from .noise import SEEDED_LABEL, LaplaceSampler, discrete_laplace_variance
from .private_data import SCORE_GRID, PrivateDataset
from .report import ComponentReport, LedgerReport
from .svt import SVTParameters, SVTSession, split_budget, svt_parameters

__all__ = [
    "check_delta",
    "check_epsilon",
    "DEFAULT_ORDERS",
    "SCORE_GRID",
    "SEEDED_LABEL",
    "AccountantStep",
    "Charge",
    "ComponentReport",
    "LaplaceSampler",
    "LedgerReport",
    "NaiveLaplaceValidator",
    "NoisyRelease",
    "PrivacyMetadata",
    "PrivateDataset",
    "SVTParameters",
    "SVTSession",
    "account",
    "components",
    "compose_loose",
    "compose_tight",
    "discrete_laplace_variance",
    "distinct_charges",
    "epsilon_from_rdp",
    "naive_epsilon",
    "opacus_epsilon",
    "rdp_of_curve",
    "rdp_of_history",
    "rdp_of_pure_dp",
    "release_utility",
    "split_budget",
    "svt_parameters",
]
