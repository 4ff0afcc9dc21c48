"""Shared test settings."""

from __future__ import annotations

import pytest
import trio.testing
from hypothesis import HealthCheck, settings

# These machines are shared and noisy: how fast hypothesis generates data, and
# how long one example takes, measure the machine, not punch. Every property is
# still checked on every example; only those two timing checks are off.
settings.register_profile("punch", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("punch")


@pytest.fixture
def slow_autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness, so loopback I/O lands first."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture(autouse=True)
def _config_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI keeps its key under ``$XDG_CONFIG_HOME``: a test directory, never the user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
