"""Fixtures of the namespace tests: ``testbed`` (torn down by name), and the demo base model and data."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.harness import demo_base, demo_data  # noqa: F401 (fixtures)
from tests.netns.testbed import Testbed, missing_requirements


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    required = os.environ.get("LORASWARM_REQUIRE_NETNS") == "1"
    missing = missing_requirements()
    if missing:
        if required:
            pytest.fail(f"netns testbed required but this machine lacks {', '.join(missing)}")
        pytest.skip(f"netns testbed needs {', '.join(missing)}")
    try:
        bed = Testbed()
    except RuntimeError as exc:  # e.g. root in a container without CAP_SYS_ADMIN
        if required:
            raise
        pytest.skip(f"cannot build network namespaces here: {exc}")
    try:
        yield bed
    finally:
        bed.close()
