"""Golden files: compare a text with its stored copy; ``LOCALSGD_UPDATE_GOLDEN=1`` rewrites the copy
instead, except when ``CI`` is set (CI compares, it never rewrites)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from .hypothesis_profile import running_under_ci

UPDATE_ENV = "LOCALSGD_UPDATE_GOLDEN"


def check_golden(text: str, path: Path) -> None:
    if os.environ.get(UPDATE_ENV) == "1":
        if running_under_ci():
            pytest.fail(f"{UPDATE_ENV}=1 would rewrite {path.name}, which is refused when CI is set; "
                        f"unset {UPDATE_ENV} in the CI environment", pytrace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        warnings.warn(f"rewrote the golden file {path} ({UPDATE_ENV}=1): review it with git diff")
    assert path.exists(), f"missing golden file {path}; run with {UPDATE_ENV}=1 to write it"
    assert text == path.read_text(), f"text differs from the golden file {path} ({UPDATE_ENV}=1 rewrites it)"
