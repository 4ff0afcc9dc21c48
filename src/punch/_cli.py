"""The ``punch`` and ``punch-rendezvous`` commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import trio

from ._endpoint import Endpoint
from ._errors import PunchFailed, RendezvousError, ReuseUnavailable, SelfDialError
from ._host import open_host
from ._race import DEFAULT_TIMEOUT
from ._server import serve_rendezvous
from ._stream import PeerStream

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RENDEZVOUS = 3
EXIT_UNKNOWN_PEER = 4
EXIT_PUNCH_FAILED = 5
EXIT_REUSE = 6
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""exit codes:
  {EXIT_OK}    the session ended cleanly
  {EXIT_ERROR}    any other error
  {EXIT_USAGE}    usage error
  {EXIT_RENDEZVOUS}    rendezvous unreachable, refused us, or closed
  {EXIT_UNKNOWN_PEER}    the peer is not registered at the rendezvous
  {EXIT_PUNCH_FAILED}    the punch failed on every candidate (or only our own endpoint was offered)
  {EXIT_REUSE}    this OS cannot share one TCP port (SO_REUSEADDR + SO_REUSEPORT)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""

_COPY_SIZE = 65536


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, not {text!r}")
    return value


class _Reporter:
    """Status lines on stderr: one human line, or one JSON object, per event."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __call__(self, event: str, text: str, **fields: Any) -> None:
        if self.as_json:
            line = json.dumps({"event": event, **fields})
        else:
            line = f"punch: {text}"
        print(line, file=sys.stderr, flush=True)


def _connected_fields(stream: PeerStream) -> dict[str, Any]:
    return {
        "peer": stream.peer_name,
        "role": stream.role.value,
        "won_by": stream.won_by.value,
        "local": str(stream.local),
        "remote": str(stream.remote),
        "connect_time": round(stream.connect_time, 6),
    }


async def _pipe(stream: PeerStream) -> None:
    """stdin -> peer (then EOF) and peer -> stdout, both to completion."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))

    async def upload() -> None:
        while data := await stdin.receive_some(_COPY_SIZE):
            await stream.send_all(data)
        await stream.send_eof()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            while data := await stream.receive_some(_COPY_SIZE):
                await stdout.send_all(data)
    finally:
        await stdin.aclose()
        await stdout.aclose()
        await stream.aclose()


async def _session(args: argparse.Namespace, report: _Reporter) -> None:
    async with open_host(
        args.name, rendezvous=args.rendezvous, local=args.local, timeout=args.timeout
    ) as host:
        report(
            "registered",
            f"registered {host.name!r} at {args.rendezvous}: "
            f"server-reflexive {host.observed}, host {host.host_candidate}",
            name=host.name,
            rendezvous=str(args.rendezvous),
            observed=str(host.observed),
            host=str(host.host_candidate),
        )
        if args.command == "connect":
            stream = await host.connect(args.peer)
        else:
            stream = await host.accept()
    fields = _connected_fields(stream)
    report(
        "connected",
        f"connected to {stream.peer_name!r} ({stream.role.value}, won by {stream.won_by.value}): "
        f"{stream.local} -> {stream.remote} in {stream.connect_time * 1000:.1f} ms",
        **fields,
    )
    await _pipe(stream)
    report("closed", f"session with {stream.peer_name!r} ended", peer=stream.peer_name)


def _failure(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, RendezvousError):
        code = EXIT_UNKNOWN_PEER if exc.code == "unknown-peer" else EXIT_RENDEZVOUS
        return code, f"rendezvous: {exc}"
    if isinstance(exc, PunchFailed | SelfDialError):
        return EXIT_PUNCH_FAILED, str(exc)
    if isinstance(exc, ReuseUnavailable):
        return EXIT_REUSE, str(exc)
    return EXIT_ERROR, f"{type(exc).__name__}: {exc}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="punch",
        description="Direct TCP between two peers behind NATs, by TCP simultaneous open.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, helptext in (
        ("listen", "wait for one peer to punch through, then pipe stdin/stdout (netcat style)"),
        ("connect", "punch through to PEER, then pipe stdin/stdout (netcat style)"),
    ):
        sub = commands.add_parser(
            name,
            help=helptext,
            description=helptext,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "connect":
            sub.add_argument("peer", metavar="PEER", help="the peer's registered name")
        sub.add_argument("--name", required=True, help="our name, 1-64 of [A-Za-z0-9._-]")
        sub.add_argument(
            "--rendezvous", required=True, type=_endpoint, metavar="IP:PORT", help="the server"
        )
        sub.add_argument(
            "--local", type=_endpoint, metavar="IP:PORT", help="bind here (default any, port 0)"
        )
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help=f"seconds for the introduction and for the punch (default {DEFAULT_TIMEOUT:g})",
        )
        sub.add_argument("--json", action="store_true", help="status as JSON lines on stderr")
        sub.add_argument(
            "-v", "--verbose", action="count", default=0, help="log each step (-vv: each attempt)"
        )
    rendezvous = commands.add_parser(
        "rendezvous", help="run a rendezvous server (same as punch-rendezvous)"
    )
    _rendezvous_arguments(rendezvous)
    return parser


def _rendezvous_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=_endpoint,
        default=Endpoint("0.0.0.0", 7000),
        metavar="IP:PORT",
        help="where to listen (default 0.0.0.0:7000; port 0 picks one); the bound "
        "IP:PORT is printed on stdout",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def _logging(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def main(argv: list[str] | None = None) -> int:
    """``punch``: see ``punch --help``. Returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "rendezvous":
        return _serve(args)
    _logging([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    report = _Reporter(args.json)
    try:
        trio.run(_session, args, report)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as exc:
        code, text = _failure(exc)
        report("error", f"error: {text}", code=code, error=text)
        return code
    return EXIT_OK


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
