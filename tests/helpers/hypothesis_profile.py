"""Deterministic, deadline-free hypothesis settings for the property tests.

``LOCALSGD_HYPOTHESIS_SCALE`` multiplies every test's number of examples (e.g. ``0.1`` while
iterating on a slow machine). Scaling *down* is refused when ``CI`` is set: CI must run the
property tests at full strength.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE_ENV = "LOCALSGD_HYPOTHESIS_SCALE"


def running_under_ci() -> bool:
    """``CI`` set to anything but empty/0/false (GitHub, GitLab and most CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def example_scale() -> float:
    """The factor from ``LOCALSGD_HYPOTHESIS_SCALE`` (default 1); a factor below 1 under CI is an error."""
    text = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(text)
    except ValueError:
        raise RuntimeError(f"{SCALE_ENV}={text!r} is not a number; unset it or give a factor such as 0.5") from None
    if not scale > 0:
        raise RuntimeError(f"{SCALE_ENV}={text!r} must be > 0; unset it or give a factor such as 0.5")
    if scale < 1 and running_under_ci():
        raise RuntimeError(f"{SCALE_ENV}={text} would scale the property tests down, which is refused when CI is set; "
                           f"unset {SCALE_ENV} in the CI environment")
    return scale


_SCALE = example_scale()
#: the base settings (not loaded as the global profile, so hypothesis tests elsewhere keep theirs)
FAST = settings(derandomize=True, deadline=None, max_examples=max(1, int(20 * _SCALE)), print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def examples(n: int) -> settings:
    """``FAST`` with ``n`` examples (times ``LOCALSGD_HYPOTHESIS_SCALE``)."""
    return settings(FAST, max_examples=max(1, int(n * _SCALE)))
