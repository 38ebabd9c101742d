"""The test helpers themselves: what the random-CNN strategy draws, and the two environment switches
(fewer property examples, rewriting golden files) that must not work under CI."""
from __future__ import annotations

import pytest

from helpers.golden import UPDATE_ENV, check_golden
from helpers.hypothesis_profile import SCALE_ENV, example_scale
from helpers.random_cnn import draw_statistics


def test_random_cnn_strategy_draws_branching_dags_and_mostly_t_above_0():
    stats = draw_statistics(100)
    assert stats["add"] >= 0.3 and stats["cat"] >= 0.3 and stats["branching"] >= 0.6, stats
    assert stats["single_conv"] <= 0.35, stats
    assert 0.02 <= stats["t0"] <= 0.2, stats          # t = 0 still drawn, but rarely


@pytest.mark.parametrize("ci", ["true", "1"])
def test_scaling_property_tests_down_is_refused_under_ci(monkeypatch, ci):
    monkeypatch.setenv(SCALE_ENV, "0.05")
    monkeypatch.delenv("CI", raising=False)
    assert example_scale() == 0.05
    monkeypatch.setenv("CI", ci)
    with pytest.raises(RuntimeError, match=f"{SCALE_ENV}=0.05 would scale the property tests down.*CI"):
        example_scale()
    monkeypatch.setenv(SCALE_ENV, "3")
    assert example_scale() == 3.0                     # more examples are always allowed
    monkeypatch.setenv(SCALE_ENV, "few")
    with pytest.raises(RuntimeError, match="not a number"):
        example_scale()


def test_golden_update_switch_never_rewrites_under_ci(monkeypatch, tmp_path):
    path = tmp_path / "golden.txt"
    path.write_text("old")
    monkeypatch.setenv(UPDATE_ENV, "1")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="refused when CI is set"):
        check_golden("new", path)
    assert path.read_text() == "old"
    monkeypatch.delenv("CI")
    with pytest.warns(UserWarning, match="rewrote the golden file"):
        check_golden("new", path)
    assert path.read_text() == "new"
    monkeypatch.delenv(UPDATE_ENV)
    check_golden("new", path)
    with pytest.raises(AssertionError, match="differs from the golden file"):
        check_golden("newer", path)
    with pytest.raises(AssertionError, match="missing golden file"):
        check_golden("new", tmp_path / "absent.txt")
