"""BYTELEAP_REQUIRE_SYSTEM_TESTS turns skipped system tests into failures, and only those."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (__import__("pathlib").Path(__file__).parents[1] / "conftest.py").read_text()

TESTS = """
import pytest

@pytest.mark.system
def test_needs_a_container():
    pytest.skip("systemd-nspawn not installed")

def test_plain_skip():
    pytest.skip("not a system test")
"""


@pytest.mark.parametrize(("required", "failed", "skipped"), [("1", 1, 1), ("", 0, 2)])
def test_system_skips_fail_only_when_required(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    required: str,
    failed: int,
    skipped: int,
) -> None:
    monkeypatch.setenv("BYTELEAP_REQUIRE_SYSTEM_TESTS", required)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "markers =\n    system: system test\n"
    )
    pytester.makepyfile(test_policy=TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=failed, skipped=skipped)
    if failed:
        result.stdout.fnmatch_lines(
            ["*BYTELEAP_REQUIRE_SYSTEM_TESTS=1*systemd-nspawn not installed*"]
        )
