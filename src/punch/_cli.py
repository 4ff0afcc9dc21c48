"""The ``punch`` and ``punch-rendezvous`` commands: arguments, status lines, exit codes."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import trio

from . import _commands
from ._commands import Reporter
from ._endpoint import Endpoint
from ._errors import (
    HandshakeError,
    HandshakeInterrupted,
    PunchFailed,
    RendezvousError,
    ReuseUnavailable,
    SelfDialError,
)
from ._host import open_host
from ._race import DEFAULT_TIMEOUT
from ._server import serve_rendezvous
from ._stream import PeerStream
from .transfer import TransferError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RENDEZVOUS = 3
EXIT_UNKNOWN_PEER = 4
EXIT_PUNCH_FAILED = 5
EXIT_REUSE = 6
EXIT_HANDSHAKE = 7
EXIT_TRANSFER = 8
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""exit codes:
  {EXIT_OK}    the session ended cleanly
  {EXIT_ERROR}    any other error
  {EXIT_USAGE}    usage error
  {EXIT_RENDEZVOUS}    rendezvous unreachable (or its name unresolvable), refused us, or closed
  {EXIT_UNKNOWN_PEER}    the peer is not registered at the rendezvous (chat: did not turn up)
  {EXIT_PUNCH_FAILED}    the punch failed on every candidate (or only our own endpoint was offered)
  {EXIT_REUSE}    this OS cannot share one TCP port (SO_REUSEADDR + SO_REUSEPORT)
  {EXIT_HANDSHAKE}    a path answered but failed authentication, and no other path worked
  {EXIT_TRANSFER}    send/receive: the file was refused, or arrived corrupt or cut short
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""

CHAT_WAIT = 120.0
"""Seconds ``punch chat`` waits for the other side to turn up, by default."""

_COMMANDS = {
    "listen": "wait for one peer to punch through, then pipe stdin/stdout (netcat style)",
    "connect": "punch through to PEER, then pipe stdin/stdout (netcat style)",
    "send": "punch through to PEER and send FILE (name, size and SHA-256 first)",
    "receive": "wait for one peer to send a file; verify it, then save it in --out",
    "chat": "line chat with PEER, who runs `punch chat` naming us; either side quits",
}


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, HOST an IP (IPv6 in brackets) or a DNS name; PORT 1-65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"IPv6 addresses need brackets: [{host}]:{port}")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 1-65535), not {text!r}")
    return host, int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, not {text!r}")
    return value


def _literal_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


async def _resolve(host: str, port: int, ipv6: bool) -> Endpoint:
    """The rendezvous's endpoint: ``host`` resolved to IPv6 or IPv4 (getaddrinfo(3)).

    Raises:
        RendezvousError: ``unreachable``: the name does not resolve in that family.
    """
    family = trio.socket.AF_INET6 if ipv6 else trio.socket.AF_INET
    try:
        infos = await trio.socket.getaddrinfo(host, port, family, trio.socket.SOCK_STREAM)
    except OSError as exc:
        version = 6 if ipv6 else 4
        raise RendezvousError(
            "unreachable", f"cannot resolve {host!r} to an IPv{version} address: {exc}"
        ) from exc
    return Endpoint.from_sockaddr(infos[0][4])


def _connected_fields(stream: PeerStream) -> dict[str, Any]:
    return {
        "peer": stream.peer_name,
        "role": stream.role.value,
        "won_by": stream.won_by.value,
        "local": str(stream.local),
        "remote": str(stream.remote),
        "connect_time": round(stream.connect_time, 6),
    }


async def _session(args: argparse.Namespace, report: Reporter) -> None:
    host_name, port = args.rendezvous
    server = await _resolve(host_name, port, args.ipv6)
    async with open_host(
        args.name, rendezvous=server, local=args.local, timeout=args.timeout
    ) as host:
        report(
            "registered",
            f"registered {host.name!r} at {server}: "
            f"server-reflexive {host.observed}, host {host.host_candidate}",
            name=host.name,
            rendezvous=str(server),
            observed=str(host.observed),
            host=str(host.host_candidate),
        )
        if args.command == "chat":
            stream = await _commands.chat_stream(host, args.peer, args.wait, report)
        elif args.command in ("connect", "send"):
            stream = await host.connect(args.peer)
        else:
            stream = await host.accept()
    report(
        "connected",
        f"connected to {stream.peer_name!r} ({stream.role.value}, won by {stream.won_by.value}): "
        f"{stream.local} -> {stream.remote} in {stream.connect_time * 1000:.1f} ms",
        **_connected_fields(stream),
    )
    if args.command == "send":
        await _commands.send(stream, args.file, report)
    elif args.command == "receive":
        await _commands.receive(stream, args.out, args.force, report)
    elif args.command == "chat":
        await _commands.chat(stream, report)
    else:
        await _commands.pipe(stream)
    report("closed", f"session with {stream.peer_name!r} ended", peer=stream.peer_name)


def _authentication_failed(exc: PunchFailed) -> bool:
    """Did some path answer but fail the handshake's proof (not merely break)?"""
    group = exc.__cause__
    errors = group.exceptions if isinstance(group, BaseExceptionGroup) else ()
    for error in errors:
        last = error if isinstance(error, HandshakeError) else error.__cause__
        if isinstance(last, HandshakeError) and not isinstance(last, HandshakeInterrupted):
            return True
    return False


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line that tell a person what went wrong."""
    if isinstance(exc, RendezvousError):
        code = EXIT_UNKNOWN_PEER if exc.code == "unknown-peer" else EXIT_RENDEZVOUS
        return code, f"rendezvous: {exc}"
    if isinstance(exc, PunchFailed) and _authentication_failed(exc):
        return EXIT_HANDSHAKE, f"authentication failed: {exc}"
    if isinstance(exc, PunchFailed | SelfDialError):
        return EXIT_PUNCH_FAILED, str(exc)
    if isinstance(exc, ReuseUnavailable):
        return EXIT_REUSE, str(exc)
    if isinstance(exc, TransferError):
        return EXIT_TRANSFER, f"transfer {exc}"
    if isinstance(exc, trio.BrokenResourceError):
        return EXIT_ERROR, f"connection to the peer lost: {exc.__cause__ or exc}"
    return EXIT_ERROR, f"{type(exc).__name__}: {exc}"


def _subcommand(commands: Any, name: str) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=_COMMANDS[name],
        description=_COMMANDS[name],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if name in ("connect", "chat"):
        sub.add_argument("peer", metavar="PEER", help="the peer's registered name")
    if name == "send":
        sub.add_argument("file", metavar="FILE", type=Path, help="the regular file to send")
        sub.add_argument("--to", dest="peer", required=True, metavar="PEER", help="the receiver")
    if name == "receive":
        sub.add_argument(
            "--out", type=Path, default=Path("."), metavar="DIR", help="where to save (default .)"
        )
        sub.add_argument("--force", action="store_true", help="replace a file of the same name")
    if name == "chat":
        sub.add_argument(
            "--wait",
            type=_seconds,
            default=CHAT_WAIT,
            metavar="SECONDS",
            help=f"how long to wait for PEER to turn up (default {CHAT_WAIT:g})",
        )
    anonymous = name in ("connect", "send")
    sub.add_argument(
        "--name",
        required=not anonymous,
        default=f"punch-{secrets.token_hex(4)}" if anonymous else None,
        help="our name, 1-64 of [A-Za-z0-9._-]" + (" (default punch-<random>)" * anonymous),
    )
    sub.add_argument(
        "--rendezvous",
        required=True,
        type=_host_port,
        metavar="HOST:PORT",
        help="the rendezvous server: an IP ([IPv6] in brackets) or a DNS name",
    )
    sub.add_argument(
        "--local", type=_endpoint, metavar="IP:PORT", help="bind here (default any, port 0)"
    )
    sub.add_argument(
        "-6",
        "--ipv6",
        action="store_true",
        help="use IPv6: resolve the rendezvous name to IPv6 and bind [::] (default IPv4)",
    )
    sub.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds for the introduction and for the punch (default {DEFAULT_TIMEOUT:g})",
    )
    sub.add_argument(
        "--json", action="store_true", help="status (and -v steps) as JSON lines on stderr"
    )
    sub.add_argument(
        "-v", "--verbose", action="count", default=0, help="log each step (-vv: each attempt)"
    )
    return sub


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="punch",
        description="Direct TCP between two peers behind NATs, by TCP simultaneous open.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        _subcommand(commands, name)
    rendezvous = commands.add_parser(
        "rendezvous",
        help="run a rendezvous server (same as punch-rendezvous)",
        description="Run a rendezvous server (same as punch-rendezvous).",
    )
    _rendezvous_arguments(rendezvous)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks argparse cannot make one argument at a time; each fails as a usage error."""
    host = args.rendezvous[0]
    if args.ipv6 and _literal_version(host) == 4:
        parser.error(f"--rendezvous {host} is IPv4, but --ipv6 was given")
    if _literal_version(host) == 6:
        args.ipv6 = True
    if args.local is not None and (args.local.address.version == 6) != args.ipv6:
        parser.error(f"--local {args.local} is not of the rendezvous's address family")
    if args.command == "send" and not args.file.is_file():
        parser.error(f"{args.file} is not a readable regular file")
    if args.command == "receive" and not args.out.is_dir():
        parser.error(f"--out {args.out} is not a directory")


def _rendezvous_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=_endpoint,
        default=Endpoint("0.0.0.0", 7000),
        metavar="IP:PORT",
        help="where to listen (default 0.0.0.0:7000; [::]:7000 for IPv6; port 0 picks one); "
        "the bound IP:PORT is printed on stdout",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


class _JsonLogs(logging.Handler):
    """Log records as ``{"event": "log", ...}`` status lines (``--json`` with ``-v``)."""

    def __init__(self, report: Reporter) -> None:
        super().__init__()
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        self.report(
            "log",
            record.getMessage(),
            time=record.created,
            level=record.levelname.lower(),
            logger=record.name,
            message=record.getMessage(),
            **getattr(record, "fields", {}),
        )


def _logging(level: int, report: Reporter | None = None) -> None:
    if report is not None and report.as_json:
        logging.basicConfig(level=level, handlers=[_JsonLogs(report)], force=True)
    else:
        logging.basicConfig(
            level=level,
            stream=sys.stderr,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            force=True,
        )


def main(argv: list[str] | None = None) -> int:
    """``punch``: see ``punch --help``. Returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "rendezvous":
        return _serve(args)
    _check(parser, args)
    report = Reporter(args.json)
    _logging([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)], report)
    try:
        _run(_session, args, report)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (OSError, ValueError, TransferError, trio.BrokenResourceError) as exc:
        code, text = _failure(exc)
        report("error", f"error: {text}", code=code, error=text)
        return code
    return EXIT_OK


def _run(*args: Any) -> None:
    """``trio.run``, raising a lone error from nested nurseries as itself."""
    try:
        trio.run(*args)
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from error.__cause__


def _serve(args: argparse.Namespace) -> int:
    _logging(logging.WARNING if args.quiet else logging.INFO)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_rendezvous, args.listen.ip, args.listen.port)
            print(bound, flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"punch-rendezvous: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def rendezvous_main(argv: list[str] | None = None) -> int:
    """``punch-rendezvous --listen IP:PORT``. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="punch-rendezvous", description="The punch rendezvous server."
    )
    _rendezvous_arguments(parser)
    return _serve(parser.parse_args(argv))
