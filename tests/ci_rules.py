"""pytest plugin: a test whose prerequisite is missing fails under ``CI=true``, unless the run
opts out by name.

The README promises behaviour that only some machines can show (the OOM killer in a memory
cgroup, a Ray cluster, the real model). Skipping such a test silently turns "survives the OOM
killer" into an untested promise on any runner without cgroups while CI stays green. So:

* A test declares its prerequisite with a marker (``cgroup``, ``ray``) or calls
  :func:`missing` itself (``real_model`` fixture).
* Locally (``CI`` unset) a missing prerequisite skips, with the reason (``-rs`` lists them).
* Under ``CI=true`` it fails the test with the reason, unless ``EMBEDPOOL_CI_ALLOW_SKIP``
  names its kind (``EMBEDPOOL_CI_ALLOW_SKIP=cgroup,ray``); the terminal summary then prints
  which kinds were allowed to skip and how many tests did.
* Under ``CI=true`` any *other* skip (a bare ``pytest.skip``, ``importorskip``) fails too: a
  skip must name a prerequisite kind to be allowed.

Registered by ``tests/conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Generator, Mapping
from typing import Literal, NoReturn

import pytest

#: Prerequisite kinds a run may opt out of, and what each stands for.
KINDS: dict[str, str] = {
    "cgroup": "a writable memory cgroup (v1, or a delegated v2) for real OOM kills",
    "ray": "Ray installed and a local cluster",
    "model": "the real default model (installed by requirements/default-model.txt)",
    "openvino": "the openvino package (the 'openvino' extra: the second engine)",
}
ALLOW_VAR = "EMBEDPOOL_CI_ALLOW_SKIP"
#: Every allowed skip's reason starts with this, so the report hook can tell it apart.
_PREFIX = "prerequisite missing"
_KIND = re.compile(re.escape(_PREFIX) + r" \((\w+)\)")

_skipped: dict[str, int] = {}


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """True under ``CI=true`` (or ``1``/``yes``), as GitHub, GitLab and .ci/run set it."""
    value = (env if env is not None else os.environ).get("CI", "")
    return value.strip().lower() in ("true", "1", "yes")


def allowed_kinds(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The kinds named in EMBEDPOOL_CI_ALLOW_SKIP; an unknown name is a usage error (a typo
    must not quietly leave a prerequisite enforced or, worse, look like an opt-out)."""
    raw = (env if env is not None else os.environ).get(ALLOW_VAR, "")
    kinds = frozenset(k.strip() for k in raw.split(",") if k.strip())
    unknown = sorted(kinds - KINDS.keys())
    if unknown:
        raise pytest.UsageError(
            f"{ALLOW_VAR}={raw!r}: unknown kind(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(KINDS))}"
        )
    return kinds


def decide(kind: str, env: Mapping[str, str] | None = None) -> Literal["skip", "fail"]:
    """What a missing prerequisite of ``kind`` does to its test. Pure."""
    if kind not in KINDS:
        raise ValueError(f"unknown prerequisite kind {kind!r}; add it to KINDS")
    if not in_ci(env) or kind in allowed_kinds(env):
        return "skip"
    return "fail"


def missing(kind: str, reason: str) -> NoReturn:
    """Skip or fail the running test because prerequisite ``kind`` is missing (see module)."""
    if decide(kind) == "fail":
        pytest.fail(
            f"{kind} prerequisite missing under CI=true: {reason}. Fix the runner, or "
            f"opt out explicitly with {ALLOW_VAR}={kind}",
            pytrace=False,
        )
    pytest.skip(f"{_PREFIX} ({kind}): {reason}")


def cgroup_reason() -> str | None:
    """None, or why no writable memory cgroup can be made here."""
    import cgroup_util

    return cgroup_util.unavailable_reason()


def ray_reason() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "the ray package is not installed (scripts/setup installs the 'ray' extra)"
    return None


def openvino_reason() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed (scripts/test installs the 'openvino' extra)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    allowed_kinds()  # fail fast on a misspelt opt-out


def pytest_runtest_setup(item: pytest.Item) -> None:
    for kind, reason_of in (
        ("cgroup", cgroup_reason),
        ("ray", ray_reason),
        ("openvino", openvino_reason),
    ):
        if item.get_closest_marker(kind) is not None:
            reason = reason_of()
            if reason is not None:
                missing(kind, reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        found = _KIND.search(reason)
        if found is not None:
            # Counted here, not in missing(): a session fixture's skip is raised once and then
            # replayed for every later test that uses it.
            _skipped[found[1]] = _skipped.get(found[1], 0) + 1
        elif in_ci():
            report.outcome = "failed"
            report.longrepr = (
                f"skipped under CI=true without naming a prerequisite kind: "
                f"{reason}. Use ci_rules.missing(kind, reason) so that the run "
                f"can opt out with {ALLOW_VAR}"
            )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    allowed = allowed_kinds()
    if not in_ci() and not allowed:
        return
    tr = terminalreporter
    if not allowed:
        tr.write_line(
            f"CI prerequisites: all enforced ({', '.join(sorted(KINDS))}); "
            f"none allowed to skip ({ALLOW_VAR} is empty)"
        )
        return
    tr.write_sep("=", f"{ALLOW_VAR}: prerequisites allowed to skip", yellow=True)
    for kind in sorted(allowed):
        tr.write_line(f"{kind}: {KINDS[kind]}: {_skipped.get(kind, 0)} test(s) skipped")
