"""A tool that needs an extra says which one to install instead of failing with a traceback."""

from __future__ import annotations

import pytest

from tools.extras import need


def test_a_missing_package_names_the_extra_to_install() -> None:
    with pytest.raises(
        SystemExit,
        match=r"python -m tools\.x needs the package 'no_such_pkg_1': pip install -e '\.\[tools\]'",
    ):
        need("no_such_pkg_1", "tools", "python -m tools.x")


def test_a_present_package_passes() -> None:
    need("json", "tools", "python -m tools.x")
