"""PRIVACY.md names, next to each guarantee, the test that checks it: every name must be a real test, and
every numbered part of the privacy issue must have one."""

from __future__ import annotations

import ast
import re

from edge_testkit import REPO

DOC = REPO / "PRIVACY.md"


def _references() -> list[tuple[str, str, str]]:
    """(guarantee number, test file, test name) of every reference in the guarantees table; a bare
    ``::name`` refers to the file named last."""
    refs = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\| (\d+|—) \|", line)
        if not row:
            continue
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", line):
            current = path or current
            assert current, f"{line!r}: ::{name} without a file before it"
            refs.append((row.group(1), current, name))
    return refs


def _tests_in(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_named_in_privacy_md_exists() -> None:
    refs = _references()
    assert len(refs) > 30
    missing = [f"{path}::{name}" for _, path, name in refs if name not in _tests_in(path)]
    assert missing == []


def test_every_part_of_the_issue_has_a_test() -> None:
    parts = {number for number, _, _ in _references()}
    assert {"1", "2", "3", "4", "5"} <= parts
