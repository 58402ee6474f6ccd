"""engine.stats: the paired Wilcoxon test against scipy, and its notes."""
import numpy as np
import pytest
from scipy import stats

from engine.stats import paired_wilcoxon


def test_matches_scipy_and_drops_nan_pairs():
    rng = np.random.default_rng(0)
    a = rng.random(12)
    b = a - 0.05 + 0.03 * rng.standard_normal(12)
    a_nan, b_nan = np.append(a, np.nan), np.append(b, 0.3)
    res = paired_wilcoxon(a_nan, b_nan)
    ref = stats.wilcoxon(a, b, alternative="two-sided")
    assert res["n"] == 12 and res["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert res["statistic"] == ref.statistic and res["note"] == ""
    assert res["median_difference"] == pytest.approx(np.median(a - b))


def test_identical_values_give_p_one_and_small_n_is_flagged():
    x = np.linspace(0.5, 0.9, 8)
    assert paired_wilcoxon(x, x)["p"] == 1.0
    small = paired_wilcoxon([0.5, 0.6, 0.7], [0.4, 0.5, 0.65])
    assert small["p"] >= 0.25 and "too small" in small["note"]
    assert paired_wilcoxon([np.nan], [1.0])["n"] == 0


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        paired_wilcoxon([1.0, 2.0], [1.0])
