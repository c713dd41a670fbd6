"""One registry of reason codes: the extension defines every code a dead letter can give,
Python refuses any other, and the README lists exactly these."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from filepipe import _native
from filepipe.stream import DeadLetter

ROOT = Path(__file__).resolve().parent.parent


def readme_reasons() -> list[str]:
    """The codes in the README's reason table (the rows after `| reason | the entry |`)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| reason | the entry |") + 2
    codes = []
    for line in lines[start:]:
        m = re.match(r"\| `([a-z0-9_]+)` \|", line)
        if not m:
            break
        codes.append(m.group(1))
    return codes


def test_the_readme_lists_every_reason_code_once() -> None:
    listed = readme_reasons()
    assert len(listed) == len(set(listed))
    assert set(listed) == set(_native.reason_codes())


def test_codes_are_unique() -> None:
    codes = _native.reason_codes()
    assert len(codes) == len(set(codes)) and all(re.fullmatch(r"[a-z0-9_]+", c) for c in codes)


def test_a_dead_letter_with_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reason code 'no_such_reason'"):
        DeadLetter(b"1-0", {}, "no_such_reason", "x")
    m = _native.Measurements(1)
    with pytest.raises(ValueError, match="unknown reason code"):
        m.fail(0, "no_such_reason", "x")


def literal_reasons() -> set[tuple[str, str]]:
    """(file, code) of every string literal the package passes as a reason: to DeadLetter
    (third argument or reason=), the consumer's dead_letter and Measurements.fail (second
    argument) and S3's _Failure."""
    found = set()
    for path in (ROOT / "python" / "filepipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            position = {"DeadLetter": 2, "dead_letter": 1, "fail": 1, "_Failure": 0}.get(name)
            if position is None:
                continue
            args = list(node.args)
            candidates = [args[position]] if len(args) > position else []
            candidates += [k.value for k in node.keywords if k.arg == "reason"]
            for arg in candidates:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add((path.name, arg.value))
    return found


def test_every_reason_the_package_writes_is_registered() -> None:
    found = literal_reasons()
    assert {code for _, code in found} >= {"max_deliveries", "db_rejected", "unreadable"}
    unknown = {(f, code) for f, code in found if code not in _native.reason_codes()}
    assert not unknown
