"""Every example runs, so an example that rots fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_echo_example_runs_on_loopback() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "echo.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "sent b'ping', got b'ping'" in done.stdout
