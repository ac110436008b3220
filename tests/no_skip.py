"""pytest plugin: a skipped test is reported as a failure (a skip hides a defect: a missing file in the
repository, an untested code path). Loaded by tests/conftest.py, so it applies to every run of the suite."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped tests fail in this repository ({reason})"
