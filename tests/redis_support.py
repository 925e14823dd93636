"""The test Redis (REDIS_URL, or MAGPIE_TEST_REDIS_URL): settings for a replica sharing it, or a skip (a failure
with MAGPIE_REQUIRE_REDIS=1) where it does not answer. Shared by the tests of the per-user limits and of replicas."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import pytest

from core.settings import Settings

REDIS_URL = os.environ.get("MAGPIE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_reachable(url: str = REDIS_URL) -> bool:
    host_port = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 6379)), timeout=2):
            return True
    except OSError:
        return False


def redis_settings(**overrides: Any) -> Settings:
    """Settings for a replica sharing the test Redis under a prefix of its own (runs never see each other's keys)."""
    if not redis_reachable():
        reason = f"Redis not reachable at {REDIS_URL}"
        if os.environ.get("MAGPIE_REQUIRE_REDIS") == "1":
            pytest.fail(reason + " (MAGPIE_REQUIRE_REDIS=1)")
        pytest.skip(reason)
    values: dict[str, Any] = {"redis_url": REDIS_URL, "redis_key_prefix": f"magpie-test-{uuid.uuid4().hex[:12]}"}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]
