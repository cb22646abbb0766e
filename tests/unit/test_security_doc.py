"""SECURITY.md names the test that shows each defence: every test file and test function it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_named_in_security_md_exists() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    named = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(named) >= 10
    missing = []
    for path, function in named:
        source = ROOT / path
        if not source.is_file():
            missing.append(path)
        elif function and f"def {function}(" not in source.read_text():
            missing.append(f"{path}::{function}")
    assert not missing, f"SECURITY.md names tests that do not exist: {missing}"
