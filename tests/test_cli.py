"""The punch commands, as real processes on loopback and through main(argv)."""

from __future__ import annotations

import pytest
from netns.scenario import PUNCH, PairRun, _wait_for, run_on_loopback

from punch import _cli


def test_listen_and_connect_pipe_both_ways_on_loopback() -> None:
    alice, bob, _ = run_on_loopback()
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    assert alice.received == b"hello from bob\n"
    assert bob.received == b"hello from alice\n"
    a, b = alice.event("connected"), bob.event("connected")
    assert a is not None
    assert b is not None
    assert (a["role"], b["role"]) == ("initiator", "responder")
    assert (a["local"], a["remote"]) == (b["remote"], b["local"])


@pytest.fixture
def rendezvous_process() -> str:  # type: ignore[misc]
    pair = PairRun()
    server = pair.start("rendezvous", [], [*PUNCH, "rendezvous", "--listen", "127.0.0.1:0"])
    address = _wait_for(
        pair.workdir / "rendezvous.out", lambda t: t.endswith("\n"), server, "rendezvous"
    )
    yield address.strip()
    pair.close()


def test_unknown_peer_exit_code_and_one_line(
    rendezvous_process: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _cli.main(["connect", "nobody", "--name", "alice", "--rendezvous", rendezvous_process])
    assert code == _cli.EXIT_UNKNOWN_PEER
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "punch: error: rendezvous: unknown-peer: 'nobody' is not registered"


def test_unreachable_rendezvous_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code = _cli.main(["connect", "bob", "--name", "alice", "--rendezvous", "127.0.0.1:1", "--json"])
    assert code == _cli.EXIT_RENDEZVOUS
    assert '"event": "error"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["connect", "--name", "alice", "--rendezvous", "127.0.0.1:7000"],  # no PEER
        ["listen", "--name", "alice", "--rendezvous", "localhost:7000"],  # not an IP
        ["listen", "--name", "alice", "--rendezvous", "127.0.0.1:7000", "--timeout", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _cli.main(argv)
    assert info.value.code == _cli.EXIT_USAGE


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli.main(["connect", "--help"])
    out = capsys.readouterr().out
    for code in (
        _cli.EXIT_RENDEZVOUS,
        _cli.EXIT_UNKNOWN_PEER,
        _cli.EXIT_PUNCH_FAILED,
        _cli.EXIT_REUSE,
    ):
        assert f"  {code}  " in out
