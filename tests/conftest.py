"""Suite-wide fixtures and plugins (the CI prerequisite rules live in ci_rules.py)."""

from __future__ import annotations

import pytest

from embedpool.models import ResolvedModel

pytest_plugins = ["ci_rules", "pytester"]


@pytest.fixture(scope="session")
def real_model() -> ResolvedModel:
    """The real default model; a missing one fails under CI=true (see ci_rules)."""
    from ci_rules import missing

    from embedpool.errors import ModelNotFoundError
    from embedpool.models import resolve_model

    try:
        return resolve_model()
    except ModelNotFoundError as exc:  # a corrupt model is a failure, never a skip
        missing("model", str(exc))
