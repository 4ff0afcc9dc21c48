"""Every example runs, so an example that rots fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("echo.py", "sent b'ping', got b'ping'"),
        ("chat.py", "alice: how is the weather behind your NAT?"),
        ("file_transfer.py", "bytes, SHA-256 verified"),
        ("many_peers.py", "dave here: ping"),
    ],
)
def test_example_runs_on_loopback(example: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / example)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_every_example_is_tested() -> None:
    tested = {"echo.py", "chat.py", "file_transfer.py", "many_peers.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
