"""Shared fixtures: a JWT issuer, and the Redis the quota tests talk to."""

from __future__ import annotations

import os

import pytest

from gateway import native
from tests.harness import Keys


def pytest_configure(config: pytest.Config) -> None:
    """Stop before any test when the native build is older than the sources: the tests would test old code."""
    stale = native.problem()
    if stale is not None:
        pytest.exit(stale, returncode=4)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis for tests: MAAS_TEST_REDIS_URL (set by .ci/run) or the local 127.0.0.1:6379."""
    return os.environ.get("MAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
