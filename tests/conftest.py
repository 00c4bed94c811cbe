"""Suite-wide policy.

System tests (marker ``system``: package builds, booted nspawn containers, molecule) may skip where
root or systemd-container is missing, always with a stated reason. CI sets
``BYTELEAP_REQUIRE_SYSTEM_TESTS=1``, which turns every such skip into a failure so a green CI run
means they really ran.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

REQUIRE_SYSTEM_TESTS = "BYTELEAP_REQUIRE_SYSTEM_TESTS"


def system_tests_required() -> bool:
    return os.environ.get(REQUIRE_SYSTEM_TESTS, "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and item.get_closest_marker("system") and system_tests_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"system test skipped but {REQUIRE_SYSTEM_TESTS}=1: {reason}"
