"""The report's contract: every stable id, in order, and the docs/api.md JSON shape."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgebundle.config import Settings
from edgebundle.doctor import CHECK_IDS, CheckResult, Report, run_doctor
from edgebundle.doctor.report import assemble
from edgebundle.errors import UsageError
from tests.support.doctor_env import diagnose, host, install_runtime, write_gguf


@pytest.mark.parametrize("runtime", ["auto", "wasmedge", "embedded"])
def test_every_stable_id_is_always_present_in_order(home: Path, runtime: str) -> None:
    report = diagnose(home, runtime=runtime)
    assert [c.id for c in report.checks] == list(CHECK_IDS)
    assert all(c.summary for c in report.checks)


def test_json_shape_matches_the_contract() -> None:
    report = Report(
        runtime="embedded",
        checks=(CheckResult("wasmedge.plugin", "fail", "not found", "run ./install.sh"),
                CheckResult("host.cpu", "ok", "x86_64")),
        reason="auto: wasmedge fails doctor's wasmedge.plugin check(s)",
    )  # fmt: skip
    assert report.to_json() == {
        "ok": False,
        "runtime": "embedded",
        "runtime_reason": "auto: wasmedge fails doctor's wasmedge.plugin check(s)",
        "checks": [
            {
                "id": "wasmedge.plugin",
                "status": "fail",
                "summary": "not found",
                "fix": "run ./install.sh",
            },
            {"id": "host.cpu", "status": "ok", "summary": "x86_64", "fix": None},
        ],
    }
    json.dumps(report.to_json())
    assert Report("wasmedge", (CheckResult("a", "warn", "w"),)).ok
    # run would not start at all: not ok, whatever the checks say
    assert not Report("wasmedge", (CheckResult("a", "ok", "w"),), refusal="no wasmedge").ok


def test_assemble_refuses_a_missing_or_repeated_id() -> None:
    results = [CheckResult(i, "ok", "fine") for i in CHECK_IDS]
    with pytest.raises(ValueError, match="missing"):
        assemble("embedded", results[1:])
    with pytest.raises(ValueError, match="twice"):
        assemble("embedded", [*results, results[0]])
    extra = assemble("embedded", [CheckResult("x.extra", "ok", "more"), *reversed(results)])
    assert [c.id for c in extra.checks] == [*CHECK_IDS, "x.extra"]


def test_unknown_runtime_is_a_usage_error(home: Path) -> None:
    with pytest.raises(UsageError):
        run_doctor(Settings(home=home), runtime="docker", host=host(), environ={})


def test_offline_checks_take_well_under_a_second(home: Path, tmp_path: Path) -> None:
    install_runtime(home)
    model = write_gguf(tmp_path / "m.gguf")
    diagnose(home, model=model)  # warm imports
    started = time.perf_counter()
    report = diagnose(home, model=model, runtime="wasmedge")
    assert time.perf_counter() - started < 1.0
    assert report.check("wasmedge.version").status == "ok"  # the subprocess did run
