"""The punch commands, as real processes on loopback and through main(argv)."""

from __future__ import annotations

import argparse
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
from netns.scenario import PUNCH, PairRun, run_on_loopback, wait_for

from punch import Endpoint, Identity, PunchFailed, _cli
from punch._commands import Progress, Reporter
from punch.transfer import FileHeader


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
def pair():  # type: ignore[no-untyped-def]
    run = PairRun()
    yield run
    run.close()


@pytest.fixture
def rendezvous_process(pair: PairRun) -> str:
    return pair.start_rendezvous([], "127.0.0.1:0")


def test_a_pair_run_leaves_no_files_behind_its_process() -> None:
    """A run's files (outputs, keys) stay readable after it closes, and go when the
    process that made them exits; each run's own directory once piled up in /tmp."""
    code = (
        "from netns.scenario import PairRun\n"
        "run = PairRun(); (run.workdir / 'bob.err').write_text('x'); run.close()\n"
        "assert (run.workdir / 'bob.err').read_text() == 'x'\n"
        "print(run.workdir)"
    )
    root = Path(__file__).parents[1]
    made = subprocess.run(
        [sys.executable, "-c", code], cwd=root, check=True, capture_output=True, text=True
    )
    workdir = Path(made.stdout.strip())
    assert workdir.name.startswith("punch-run-")
    assert not workdir.exists()
    assert not workdir.parent.exists()


def test_json_with_vv_gives_every_step_as_json(pair: PairRun) -> None:
    alice, bob, _ = pair.run(
        rendezvous_prefix=[],
        rendezvous_listen="127.0.0.1:0",
        listener_prefix=[],
        connector_prefix=[],
        connector_args=("-vv",),
    )
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    assert all(line.startswith("{") for line in alice.stderr.splitlines())
    logs = [e for e in alice.events if e["event"] == "log"]
    messages = " | ".join(e["message"] for e in logs)
    assert "introduced to 'bob' as initiator; its candidates: srflx" in messages
    assert "racing accept" in messages
    assert "srflx 127.0.0.1:" in messages
    assert "(IPv4)" in messages  # each candidate's family, in the racing line
    assert "nominated" in messages
    attempts = [e for e in logs if "attempt" in e]
    assert attempts
    assert {e["level"] for e in attempts} <= {"debug", "info"}
    assert all(e["candidate"].startswith(("srflx ", "host ")) for e in attempts)


def test_a_pinned_peer_id_is_proven_over_tls(
    pair: PairRun, capsys: pytest.CaptureFixture[str]
) -> None:
    key = pair.workdir / "bob.pem"  # bob's --identity file, made by `punch id`
    assert _cli.main(["id", "--identity", str(key)]) == _cli.EXIT_OK
    printed = capsys.readouterr().out
    bob_id = Identity.load(key)
    assert printed == bob_id.peer_id + "\n"  # what bob tells alice to pin
    alice, bob, _ = pair.run(
        rendezvous_prefix=[],
        rendezvous_listen="127.0.0.1:0",
        listener_prefix=[],
        connector_prefix=[],
        connector_args=("--peer-id", bob_id.peer_id),
    )
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    assert bob.received == b"hello from alice\n"
    a, b = alice.event("connected"), bob.event("connected")
    assert a is not None
    assert b is not None
    assert (a["encrypted"], a["peer_id"]) == (True, bob_id.peer_id)
    assert b["peer_id"] == Identity.load(pair.workdir / "alice.pem").peer_id
    registered = bob.event("registered")
    assert registered is not None
    assert registered["peer_id"] == bob_id.peer_id  # also printed on registering


def test_a_wrong_peer_id_is_refused_before_the_punch(pair: PairRun) -> None:
    alice, bob, _ = pair.run(
        rendezvous_prefix=[],
        rendezvous_listen="127.0.0.1:0",
        listener_prefix=[],
        connector_prefix=[],
        listener_args=("--timeout", "1"),
        connector_args=("--peer-id", Identity.generate().peer_id),
    )
    assert alice.returncode == _cli.EXIT_HANDSHAKE, alice.stderr
    error = alice.event("error")
    assert error is not None
    assert "not the pinned" in error["error"]
    assert bob.returncode == _cli.EXIT_PUNCH_FAILED  # nobody punched back


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
        ["listen", "--name", "alice", "--rendezvous", "::1:7000"],  # no brackets
        ["listen", "--name", "alice", "--rendezvous", "127.0.0.1:7000", "--ipv6"],
        ["listen", "--name", "alice", "--rendezvous", "[::1]:7000", "-4"],
        ["listen", "--name", "alice", "--rendezvous", "h:7000", "-4", "-6"],
        ["listen", "--name", "a", "--rendezvous", "127.0.0.1:7000", "--local", "[::1]:0"],
        ["listen", "--name", "a", "--rendezvous", "h:7000", "-4", "--local", "[::1]:0"],
        ["listen", "--name", "alice", "--rendezvous", "h:7000", "--stagger", "3"],
        ["send", "/nonexistent/file", "--to", "bob", "--rendezvous", "127.0.0.1:7000"],
        ["send", "/", "--to", "bob", "--rendezvous", "127.0.0.1:7000"],  # not a file
        ["receive", "--name", "bob", "--rendezvous", "127.0.0.1:7000", "--out", "/nonexistent"],
        ["chat", "--name", "bob", "--rendezvous", "127.0.0.1:7000"],  # no PEER
        ["listen", "--name", "alice", "--rendezvous", "127.0.0.1:7000", "--timeout", "0"],
        ["connect", "bob", "--rendezvous", "127.0.0.1:7000", "--peer-id", "not-an-id"],
        ["connect", "bob", "--rendezvous", "127.0.0.1:7000", "--peer-id", "a" * 32, "--no-encrypt"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _cli.main(argv)
    assert info.value.code == _cli.EXIT_USAGE


@pytest.mark.parametrize("command", ["listen", "connect", "send", "receive", "chat"])
def test_help_documents_options_and_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _cli.main([command, "--help"])
    out = capsys.readouterr().out
    options = ("--name", "--rendezvous", "--local", "--ipv4", "--ipv6", "--stagger", "--timeout")
    for option in (*options, "--json", "-v"):
        assert option in out
    for code in (
        _cli.EXIT_USAGE,
        _cli.EXIT_RENDEZVOUS,
        _cli.EXIT_UNKNOWN_PEER,
        _cli.EXIT_PUNCH_FAILED,
        _cli.EXIT_REUSE,
        _cli.EXIT_HANDSHAKE,
        _cli.EXIT_TRANSFER,
    ):
        assert f"  {code}  " in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("listen", "connect", "send", "receive", "chat", "rendezvous", "id"):
        assert f"    {command} " in out


@pytest.mark.parametrize(
    ("authentication_failed", "code"),
    [(False, _cli.EXIT_PUNCH_FAILED), (True, _cli.EXIT_HANDSHAKE)],
)
def test_a_failed_proof_has_its_own_exit_code(authentication_failed: bool, code: int) -> None:
    error = PunchFailed("punch to 'bob' failed", authentication_failed=authentication_failed)
    assert _cli._failure(error)[0] == code


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    header = FileHeader("f.bin", 1000, "0" * 64)
    terminal, log = _Terminal(), io.StringIO()
    bar = Progress(Reporter(False, log), "sent", terminal)
    plain = Progress(Reporter(False, log), "sent", io.StringIO())
    for done in range(0, 1001, 50):
        bar(header, done)
        plain(header, done)
    bar.close()
    assert "sent f.bin: 100%" in terminal.getvalue()  # tqdm's bar, with rate
    assert "B/s" in terminal.getvalue()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10  # one per 10%, not one per chunk
    assert lines[-1].startswith("punch: sent 0.0 MiB of 0.0 MiB (100%)")
    assert "ETA" in lines[0]


def _transfer(pair: PairRun, address: str, inbox: Path, source: Path, *extra: str) -> tuple:
    bob = pair.start_peer("bob", [], ["receive", "--out", str(inbox), *extra], address)
    alice = pair.start_peer("alice", [], ["send", str(source), "--to", "bob"], address)
    return pair.wait("alice", alice, 30), pair.wait("bob", bob, 30)


def test_send_and_receive_verify_the_file(
    pair: PairRun, rendezvous_process: str, tmp_path: Path
) -> None:
    source, inbox = tmp_path / "notes.txt", tmp_path / "inbox"
    source.write_bytes(b"line\n" * 100_000)
    inbox.mkdir()
    alice, bob = _transfer(pair, rendezvous_process, inbox, source)
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    assert (inbox / "notes.txt").read_bytes() == source.read_bytes()
    saved = bob.event("verified")
    assert saved
    assert saved["path"] == str(inbox / "notes.txt")
    assert [e["done"] for e in alice.events if e["event"] == "progress"][-1] == 500_000


def test_receive_refuses_to_overwrite_without_force(
    pair: PairRun, rendezvous_process: str, tmp_path: Path
) -> None:
    source, inbox = tmp_path / "notes.txt", tmp_path / "inbox"
    source.write_bytes(b"new")
    inbox.mkdir()
    (inbox / "notes.txt").write_bytes(b"old")
    alice, bob = _transfer(pair, rendezvous_process, inbox, source)
    assert (alice.returncode, bob.returncode) == (_cli.EXIT_TRANSFER, _cli.EXIT_TRANSFER)
    error = alice.event("error")
    assert error
    assert "refused: notes.txt already exists at the receiver" in error["error"]
    assert (inbox / "notes.txt").read_bytes() == b"old"
    alice, bob = _transfer(pair, rendezvous_process, inbox, source, "--force")
    assert (alice.returncode, bob.returncode) == (0, 0), (alice.stderr, bob.stderr)
    assert (inbox / "notes.txt").read_bytes() == b"new"


def _chatter(pair: PairRun, name: str, peer: str, address: str) -> subprocess.Popen[bytes]:
    argv = [*PUNCH, "chat", peer, "--name", name, "--rendezvous", address, "--ipv6"]
    out = (pair.workdir / f"{name}.out").open("wb")
    err = (pair.workdir / f"{name}.err").open("wb")
    with out, err:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err)
    pair.processes.append(process)
    return process


def test_chat_over_ipv6_both_ways_until_one_side_quits(pair: PairRun) -> None:
    address = pair.start_rendezvous([], "[::1]:0")
    # alice sorts first, so she asks for bob, and asks again until he registers
    alice = _chatter(pair, "alice", "bob", address)
    wait_for(pair.workdir / "alice.err", lambda t: "waiting for 'bob'" in t, alice, "alice")
    bob = _chatter(pair, "bob", "alice", address)
    assert alice.stdin is not None
    assert bob.stdin is not None
    alice.stdin.write(b"hi bob\n")
    alice.stdin.flush()
    bob.stdin.write(b"hi alice\n")
    bob.stdin.flush()
    wait_for(pair.workdir / "bob.out", lambda t: "alice> hi bob\n" in t, bob, "bob")
    wait_for(pair.workdir / "alice.out", lambda t: "bob> hi alice\n" in t, alice, "alice")
    alice.stdin.close()  # alice quits; bob's chat ends too
    assert alice.wait(timeout=10) == 0
    assert bob.wait(timeout=10) == 0
    assert "'alice' left the chat" in (pair.workdir / "bob.err").read_text()
    assert "connected to 'bob' (initiator" in (pair.workdir / "alice.err").read_text()
    assert "[::1]:" in (pair.workdir / "alice.err").read_text()


def test_a_chat_peer_that_never_turns_up_is_unknown(
    rendezvous_process: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "zed", "--name", "amy", "--rendezvous", rendezvous_process, "--wait", "1"]
    assert _cli.main(argv) == _cli.EXIT_UNKNOWN_PEER
    assert "'zed' did not turn up within 1 s" in capsys.readouterr().err


def test_rendezvous_may_be_a_dns_name(rendezvous_process: str) -> None:
    port = Endpoint.parse(rendezvous_process).port
    argv = [*PUNCH, "connect", "nobody", "--rendezvous", f"localhost:{port}", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == _cli.EXIT_UNKNOWN_PEER
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events[0]["rendezvous"] == f"127.0.0.1:{port}"


def test_sigterm_tells_peers_and_exits_0_within_5_s(pair: PairRun) -> None:
    address = pair.start_rendezvous([], "127.0.0.1:0")
    server = pair.processes[-1]
    bob = pair.start_peer("bob", [], ["listen"], address)
    start = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=5) == 0
    assert time.monotonic() - start < 5
    # bob was told why, and outlives his rendezvous: he waits to register again
    told = wait_for(pair.workdir / "bob.err", lambda t: "reconnecting" in t, bob, "bob")
    assert "shutting-down" in told
    assert bob.poll() is None


def test_options_are_parsed_once_into_a_frozen_object() -> None:
    parser = _cli._parser()
    args = parser.parse_args(["connect", "bob", "--rendezvous", "[::1]:7000", "--timeout", "3"])
    options = _cli._options(parser, args)
    assert (options.command, options.peer, options.timeout) == ("connect", "bob", 3.0)
    assert options.family is None  # an IPv6 literal still holds both families ...
    assert not args.ipv6  # ... and argparse's parse is left as it was
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.peer = "eve"  # type: ignore[misc]


def test_a_command_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--shout", action="store_true")

    echo = _cli.Command("echo what the peer says", arguments, _cli._accept, _cli._pipe)
    monkeypatch.setitem(_cli.COMMANDS, "echo", echo)
    parser = _cli._parser()
    args = parser.parse_args(["echo", "--shout", "--name", "e", "--rendezvous", "h:1"])
    assert args.shout
    assert _cli._options(parser, args).command == "echo"
    assert "echo what the peer says" in parser.format_help()
