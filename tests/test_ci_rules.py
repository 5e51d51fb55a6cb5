"""tests/ci_rules.py: under CI=true a missing prerequisite fails unless the run opts out."""

from __future__ import annotations

import pytest
from ci_rules import ALLOW_VAR, decide

# (id, environment, kind, decision)
DECISIONS = [
    ("local", {}, "cgroup", "skip"),
    ("ci", {"CI": "true"}, "cgroup", "fail"),
    ("ci-allowed", {"CI": "true", ALLOW_VAR: "cgroup,ray"}, "cgroup", "skip"),
    ("ci-other-allowed", {"CI": "true", ALLOW_VAR: "ray"}, "cgroup", "fail"),
    ("ci-spaces", {"CI": "true", ALLOW_VAR: " model , ray "}, "model", "skip"),
    ("ci-false", {"CI": "false"}, "ray", "skip"),
]


@pytest.mark.parametrize(
    ("env", "kind", "want"), [r[1:] for r in DECISIONS], ids=[r[0] for r in DECISIONS]
)
def test_decide(env: dict[str, str], kind: str, want: str) -> None:
    assert decide(kind, env) == want


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(pytest.UsageError, match="cgroups"):
        decide("cgroup", {"CI": "true", ALLOW_VAR: "cgroups"})
    with pytest.raises(ValueError, match="gpu"):
        decide("gpu", {})


_SUITE = """
import pytest
from ci_rules import missing

@pytest.mark.cgroup
def test_marked() -> None:
    pass

@pytest.fixture(scope="session")
def model() -> None:  # a session fixture's skip is replayed for each test that uses it
    missing("model", "no model here")

def test_needs_model(model: None) -> None:
    pass

def test_needs_model_too(model: None) -> None:
    pass

def test_bare_skip() -> None:
    pytest.skip("for no declared reason")
"""


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> pytest.RunResult:
    import ci_rules

    for name in ("CI", ALLOW_VAR):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Whatever this machine has, the inner suite sees no cgroup.
    monkeypatch.setattr(ci_rules, "cgroup_reason", lambda: "no cgroup (test)")
    monkeypatch.setattr(ci_rules, "_skipped", {})
    pytester.makepyfile(_SUITE)
    pytester.makeini("[pytest]\nmarkers =\n    cgroup: needs a cgroup\n")
    return pytester.runpytest_inprocess("-p", "ci_rules", "-rs", "-p", "no:cacheprovider")


def test_locally_missing_prerequisites_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, {})
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["*prerequisite missing (cgroup): no cgroup (test)*"])


def test_under_ci_every_skip_fails_with_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, {"CI": "true"})
    result.assert_outcomes(failed=1, errors=3)  # prerequisites are checked in setup
    result.stdout.fnmatch_lines(
        [
            "*cgroup prerequisite missing under CI=true: no cgroup (test)*",
            "*model prerequisite missing under CI=true: no model here*",
            "*without naming a prerequisite kind: *for no declared reason*",
            "*none allowed to skip*",
        ]
    )


def test_under_ci_an_opt_out_skips_and_is_printed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, {"CI": "true", ALLOW_VAR: "cgroup,model"})
    result.assert_outcomes(skipped=3, failed=1)  # the bare skip still fails
    result.stdout.fnmatch_lines(
        [
            f"*{ALLOW_VAR}: prerequisites allowed to skip*",
            "cgroup: *1 test(s) skipped",
            "model: *2 test(s) skipped",
        ]
    )
