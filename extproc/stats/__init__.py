"""Statistics for comparing a candidate (treatment) with the stable variant (control).

Conventions: every difference is treatment minus control, every relative difference is
``treatment / control - 1``, every level is ``alpha``. Functions are pure (numpy arrays or
counts in, frozen dataclasses out) so the evaluator can call them on each look and log results.

Modules, by the question they answer:

* :mod:`~extproc.stats.sequential`: *should we roll back now?* One-sided harm tests valid under
  continuous monitoring (means, event rates, quantiles). The evaluator's guardrails.
* :mod:`~extproc.stats.exceedance`: tail and ceiling tests with e-values (quantile tails beyond
  a fixed reference, absolute ceilings), whose evidence carries across ramp stages.
* :mod:`~extproc.stats.stratified`: the exact stage-end tail test, read once per stage on the
  tail events of every stage so far.
* :mod:`~extproc.stats.clustered`: design effects of requests clustered by conversation.
* :mod:`~extproc.stats.classic`: *what does this sample say?* Welch, two-proportion z,
  Mann-Whitney U, effect sizes, win rate with a Wilson interval. One look only.
* :mod:`~extproc.stats.quantiles`: confidence intervals for a quantile and for the difference of
  a quantile between arms (order-statistic or bootstrap). One look only.
* :mod:`~extproc.stats.abtest`: the rest of an A/B decision: the exact win-rate test, Cohen's d
  with an interval, Mood's median test, Holm's adjustment. One look only.
* :mod:`~extproc.stats.power`: sample sizes for proportions, means and win rates.
* :mod:`~extproc.stats.srm`: sample-ratio-mismatch checks (chi-square and always-valid).
* :mod:`~extproc.stats.moments`: :class:`RunningMoments`, the mergeable summary behind the means.

``docs/STATISTICS.md`` states each method's assumptions, error rates and limits, with the
simulation figures from ``bench/simulate_aa.py``.
"""

from extproc.stats.classic import (
    cohens_d,
    hedges_g,
    mann_whitney_u,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
    win_rate,
)
from extproc.stats.clustered import column_design_effect, design_effect
from extproc.stats.exceedance import mean_ceiling_test, quantile_exceedance_test, rate_ceiling_test
from extproc.stats.moments import RunningMoments
from extproc.stats.power import sample_size_means, sample_size_proportions
from extproc.stats.quantiles import quantile_ci, quantile_difference
from extproc.stats.results import (
    Alternative,
    Comparison,
    HarmTest,
    Interval,
    QuantileComparison,
    SampleSize,
    SrmResult,
    WinRate,
)
from extproc.stats.sequential import (
    confidence_sequence_rank,
    mean_harm_test,
    proportion_harm_test,
    quantile_confidence_sequence,
    quantile_harm_test,
    win_rate_harm_test,
)
from extproc.stats.srm import sample_ratio_mismatch, sequential_sample_ratio_mismatch

__all__ = [
    "Alternative",
    "Comparison",
    "HarmTest",
    "Interval",
    "QuantileComparison",
    "RunningMoments",
    "SampleSize",
    "SrmResult",
    "WinRate",
    "cohens_d",
    "column_design_effect",
    "confidence_sequence_rank",
    "design_effect",
    "hedges_g",
    "mann_whitney_u",
    "mean_ceiling_test",
    "mean_harm_test",
    "proportion_harm_test",
    "quantile_ci",
    "quantile_confidence_sequence",
    "quantile_difference",
    "quantile_exceedance_test",
    "quantile_harm_test",
    "rate_ceiling_test",
    "sample_ratio_mismatch",
    "sample_size_means",
    "sample_size_proportions",
    "sequential_sample_ratio_mismatch",
    "two_proportion_z_test",
    "welch_t_test",
    "wilson_interval",
    "win_rate",
    "win_rate_harm_test",
]
