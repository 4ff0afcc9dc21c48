"""The ``punch`` and ``punch-rendezvous`` commands: arguments, status lines, exit codes."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import resource
import secrets
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from . import _commands, _workers
from ._cluster import ClusterUnavailable
from ._commands import Reporter
from ._endpoint import Endpoint
from ._errors import (
    PeerVerificationError,
    PunchFailed,
    RendezvousError,
    ReuseUnavailable,
    SelfDialError,
)
from ._host import Host, open_host
from ._identity import Identity, check_peer_id
from ._protocol import MAX_RELAY_DELAY, MAX_TOKEN
from ._race import (
    DEFAULT_RELAY_STAGGER,
    DEFAULT_STAGGER,
    DEFAULT_TIMEOUT,
    MAX_STAGGER,
    MIN_STAGGER,
    RelayMode,
)
from ._relay import Relay, RelayLimits
from ._server import LOOPBACK, ServerLimits, serve_relay, serve_rendezvous
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
  {EXIT_HANDSHAKE}    a path answered but failed authentication, and no other path worked,
       or the peer's key is not the one it registered or the one --peer-id names
  {EXIT_TRANSFER}    send/receive: the file was refused, or arrived corrupt or cut short
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""

CHAT_WAIT = 120.0
"""Seconds ``punch chat`` waits for the other side to turn up, by default."""
DEFAULT_MAX_SIZE = 4 << 30
"""Bytes: the largest file ``punch receive`` takes unless ``--max-size`` says otherwise."""
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """``--max-size``: ``"1048576"``, ``"512K"``, ``"4G"``... as bytes (>= 1)."""
    digits, unit = text.strip(), ""
    if digits[-1:].upper() in ("K", "M", "G", "T"):
        digits, unit = digits[:-1], digits[-1].upper()
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"expected bytes >= 1, optionally with K/M/G/T: {text!r}")
    return int(digits) * _SIZE_UNITS[unit]


@attrs.frozen
class Options:
    """What one ``punch`` command was asked for: parsed, checked once, frozen.

    The fields a command does not take keep their defaults.
    """

    command: str
    name: str
    rendezvous: tuple[str, int]
    """The server's name or IP, and its port, as given (resolved per ``family``)."""
    local: Endpoint | None
    family: socket.AddressFamily | None
    """``-4``/``-6`` (or ``--local``'s family): that family only; None: both."""
    timeout: float
    token: str | None
    ssl_context: ssl.SSLContext | None
    json: bool
    verbose: int
    peer: str | None = None
    file: Path | None = None
    out: Path = Path(".")
    force: bool = False
    max_size: int = DEFAULT_MAX_SIZE
    wait: float = CHAT_WAIT
    identity: Identity | None = None
    """Loaded from ``--identity`` (default :func:`default_identity_path`), created if missing."""
    peer_id: str | None = None
    """``--peer-id``: the peer must prove this key."""
    encrypt: bool = True
    """Off with ``--no-encrypt``."""
    stagger: float = DEFAULT_STAGGER
    """``--stagger``: seconds IPv4 candidates wait while IPv6 ones are dialled."""
    relay: str = RelayMode.FALLBACK.value
    """``--relay``: fallback, never or only (:class:`~punch.RelayMode`)."""
    relay_stagger: float = DEFAULT_RELAY_STAGGER
    """``--relay-stagger``: seconds the relay waits while the direct paths race."""


def default_identity_path() -> Path:
    """Where the CLI keeps its key: ``$XDG_CONFIG_HOME/punch/identity.pem``
    (``~/.config/punch/identity.pem`` without it; XDG Base Directory spec)."""
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config, "punch", "identity.pem")


Acquire = Callable[[Host, Options, Reporter], Awaitable[PeerStream]]
Use = Callable[[PeerStream, Options, Reporter], Awaitable[None]]


@attrs.frozen
class Command:
    """One ``punch`` command, whole: adding a command is adding one of these to :data:`COMMANDS`.

    Attributes:
        help: one line for ``punch --help``.
        arguments: adds the command's own arguments to its subparser.
        acquire: gets the punched stream from the registered host.
        use: what the command does with the stream.
        check: a usage error for options argparse cannot judge one at a time, or None.
        anonymous: ``--name`` is optional (a random one), for commands that only dial.
    """

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    acquire: Acquire
    use: Use
    check: Callable[[Options], str | None] = lambda options: None
    anonymous: bool = False


def _peer_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("peer", metavar="PEER", help="the peer's registered name")


def _send_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("file", metavar="FILE", type=Path, help="the regular file to send")
    sub.add_argument("--to", dest="peer", required=True, metavar="PEER", help="the receiver")


def _receive_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="where to save (default .)"
    )
    sub.add_argument("--force", action="store_true", help="replace a file of the same name")
    sub.add_argument(
        "--max-size",
        type=_size,
        default=DEFAULT_MAX_SIZE,
        metavar="SIZE",
        help="refuse a larger file: bytes, or with K, M, G or T (powers of 1024; "
        "default 4G); a file larger than the free space is refused too",
    )


def _chat_arguments(sub: argparse.ArgumentParser) -> None:
    _peer_argument(sub)
    sub.add_argument(
        "--wait",
        type=_seconds,
        default=CHAT_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for PEER to turn up (default {CHAT_WAIT:g})",
    )


async def _accept(host: Host, options: Options, report: Reporter) -> PeerStream:
    return await host.accept()


async def _connect(host: Host, options: Options, report: Reporter) -> PeerStream:
    assert options.peer is not None  # a required argument of every dialling command
    return await host.connect(options.peer, peer_id=options.peer_id)


async def _chat_stream(host: Host, options: Options, report: Reporter) -> PeerStream:
    assert options.peer is not None
    return await _commands.chat_stream(host, options.peer, options.wait, report)


async def _pipe(stream: PeerStream, options: Options, report: Reporter) -> None:
    await _commands.pipe(stream)


async def _send(stream: PeerStream, options: Options, report: Reporter) -> None:
    assert options.file is not None
    await _commands.send(stream, options.file, report)


async def _receive(stream: PeerStream, options: Options, report: Reporter) -> None:
    await _commands.receive(stream, options.out, options.force, options.max_size, report)


async def _chat(stream: PeerStream, options: Options, report: Reporter) -> None:
    await _commands.chat(stream, report)


def _readable_file(options: Options) -> str | None:
    assert options.file is not None
    return None if options.file.is_file() else f"{options.file} is not a readable regular file"


def _directory(options: Options) -> str | None:
    return None if options.out.is_dir() else f"--out {options.out} is not a directory"


COMMANDS: dict[str, Command] = {
    "listen": Command(
        "wait for one peer to punch through, then pipe stdin/stdout (netcat style)",
        lambda sub: None,
        _accept,
        _pipe,
    ),
    "connect": Command(
        "punch through to PEER, then pipe stdin/stdout (netcat style)",
        _peer_argument,
        _connect,
        _pipe,
        anonymous=True,
    ),
    "send": Command(
        "punch through to PEER and send FILE (name, size and SHA-256 first)",
        _send_arguments,
        _connect,
        _send,
        check=_readable_file,
        anonymous=True,
    ),
    "receive": Command(
        "wait for one peer to send a file; verify it, then save it in --out",
        _receive_arguments,
        _accept,
        _receive,
        check=_directory,
    ),
    "chat": Command(
        "line chat with PEER, who runs `punch chat` naming us; either side quits",
        _chat_arguments,
        _chat_stream,
        _chat,
    ),
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


async def _resolve(host: str, port: int, family: socket.AddressFamily | None) -> list[Endpoint]:
    """The rendezvous's endpoints: ``host`` resolved (getaddrinfo(3)) in ``family``,
    or in both, IPv6 first (RFC 6724 §10.3's default policy), each address once.

    Raises:
        RendezvousError: ``unreachable``: the name does not resolve in that family.
    """
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, family or socket.AF_UNSPEC, socket.SOCK_STREAM
        )
    except OSError as exc:
        wanted = {socket.AF_INET: "an IPv4 address", socket.AF_INET6: "an IPv6 address"}
        what = wanted[family] if family is not None else "an address"
        raise RendezvousError("unreachable", f"cannot resolve {host!r} to {what}: {exc}") from exc
    found = dict.fromkeys(Endpoint.from_sockaddr(info[4]) for info in infos)
    return sorted(found, key=lambda e: e.family != socket.AF_INET6)


def _connected_fields(stream: PeerStream) -> dict[str, Any]:
    return {
        "peer": stream.peer_name,
        "role": stream.role.value,
        "won_by": stream.won_by.value,
        "path": stream.path.value,
        "local": str(stream.local),
        "remote": str(stream.remote),
        "connect_time": round(stream.connect_time, 6),
        "peer_id": stream.peer_id,
        "encrypted": stream.encrypted,
        "attempts": [a.as_json() for a in stream.attempts],
        "probes": stream.probes.as_json() if stream.probes is not None else None,
    }


async def _session(options: Options, report: Reporter) -> None:
    """Register, get the stream as the command does, use it, say each step."""
    command = COMMANDS[options.command]
    host_name, port = options.rendezvous
    servers = await _resolve(host_name, port, options.family)
    async with open_host(
        options.name,
        rendezvous=servers,
        local=options.local,
        family=options.family,
        stagger=options.stagger,
        relay=options.relay,
        relay_stagger=options.relay_stagger,
        timeout=options.timeout,
        token=options.token,
        rendezvous_ssl_context=options.ssl_context,
        rendezvous_hostname=host_name,
        identity=options.identity,
        encrypt=options.encrypt,
    ) as host:
        report(
            "registered",
            f"registered {host.name!r} at {host.rendezvous}: "
            f"server-reflexive {host.observed}, host {', '.join(map(str, host.host_candidates))}, "
            f"peer ID {host.identity.peer_id}",
            name=host.name,
            peer_id=host.identity.peer_id,
            rendezvous=str(host.rendezvous),
            observed=str(host.observed),
            host=str(host.host_candidate),
            host_candidates=[str(e) for e in host.host_candidates],
            local=[str(e) for e in host.locals],
        )
        stream = await command.acquire(host, options, report)
        if options.peer_id is not None and stream.peer_id != options.peer_id:
            await trio.aclose_forcefully(stream)
            raise PeerVerificationError(
                f"{stream.peer_name!r} proved peer ID {stream.peer_id}, not {options.peer_id}",
                expected=options.peer_id,
                presented=stream.peer_id,
            )
        security = f"TLS 1.3, peer ID {stream.peer_id}" if stream.encrypted else "plaintext"
        report(
            "connected",
            f"connected to {stream.peer_name!r} ({stream.role.value}, {stream.path.value}, "
            f"won by {stream.won_by.value}): "
            f"{stream.local} -> {stream.remote} in {stream.connect_time * 1000:.1f} ms, {security}",
            **_connected_fields(stream),
        )
        # the host stays open while the stream is used: a relayed one may move
        async with trio.open_nursery() as watching:
            watching.start_soon(_report_move, stream, report)
            await command.use(stream, options, report)
            watching.cancel_scope.cancel()
    report("closed", f"session with {stream.peer_name!r} ended", peer=stream.peer_name)


async def _report_move(stream: PeerStream, report: Reporter) -> None:
    """Say so when a relayed stream moves to a direct connection (issue 17)."""
    await stream.moved.wait()
    report(
        "moved",
        f"moved to a direct connection: {stream.local} -> {stream.remote}",
        path=stream.path.value,
        local=str(stream.local),
        remote=str(stream.remote),
    )


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line that tell a person what went wrong."""
    if isinstance(exc, PeerVerificationError):
        return EXIT_HANDSHAKE, f"peer verification failed: {exc}"
    if isinstance(exc, RendezvousError):
        code = EXIT_UNKNOWN_PEER if exc.code == "unknown-peer" else EXIT_RENDEZVOUS
        return code, f"rendezvous: {exc}"
    if isinstance(exc, PunchFailed) and exc.authentication_failed:
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
    command = COMMANDS[name]
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=command.help,
        description=command.help,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.arguments(sub)
    anonymous = command.anonymous
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
    families = sub.add_mutually_exclusive_group()
    families.add_argument(
        "-4",
        "--ipv4",
        action="store_true",
        help="IPv4 only: resolve the rendezvous to IPv4 and hold a port in IPv4 only "
        "(default both families, IPv6 candidates first)",
    )
    families.add_argument(
        "-6",
        "--ipv6",
        action="store_true",
        help="IPv6 only: resolve the rendezvous to IPv6 and hold a port in IPv6 only",
    )
    sub.add_argument(
        "--stagger",
        type=_seconds,
        default=DEFAULT_STAGGER,
        metavar="SECONDS",
        help=f"seconds IPv4 candidates wait while IPv6 ones are dialled (RFC 8305 happy "
        f"eyeballs; 0.01-2, default {DEFAULT_STAGGER:g})",
    )
    sub.add_argument(
        "--relay",
        choices=[m.value for m in RelayMode],
        default=RelayMode.FALLBACK.value,
        help="fallback: a stream through the rendezvous's relay (punch-rendezvous --relay) "
        "competes once --relay-stagger has passed, or at once where no direct path can exist; "
        "never: direct only; only: relayed only (default fallback)",
    )
    sub.add_argument(
        "--relay-stagger",
        type=_seconds,
        default=DEFAULT_RELAY_STAGGER,
        metavar="SECONDS",
        help=f"seconds the relay waits while the direct paths race (0-60, default "
        f"{DEFAULT_RELAY_STAGGER:g}); the initiator's counts for both",
    )
    sub.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds for the introduction and for the punch (default {DEFAULT_TIMEOUT:g})",
    )
    sub.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the rendezvous's access token, read from FILE (surrounding whitespace dropped)",
    )
    tls_client_arguments(sub)
    _identity_argument(sub)
    sub.add_argument(
        "--peer-id",
        type=_peer_id,
        metavar="ID",
        help="the peer must prove this key (its peer ID, printed when it registers)",
    )
    sub.add_argument(
        "--no-encrypt",
        dest="encrypt",
        action="store_false",
        help="no TLS on the punched stream (both peers must say so; no --peer-id then)",
    )
    sub.add_argument(
        "--json", action="store_true", help="status (and -v steps) as JSON lines on stderr"
    )
    sub.add_argument(
        "-v", "--verbose", action="count", default=0, help="log each step (-vv: each attempt)"
    )
    return sub


def _identity_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--identity",
        dest="identity_file",
        type=Path,
        metavar="FILE",
        help="our Ed25519 key (PEM), created 0600 if missing "
        "(default $XDG_CONFIG_HOME/punch/identity.pem, else ~/.config/punch/identity.pem)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="punch",
        description="Direct TCP between two peers behind NATs, by TCP simultaneous open.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        _subcommand(commands, name)
    rendezvous = commands.add_parser(
        "rendezvous",
        help="run a rendezvous server (same as punch-rendezvous)",
        description="Run a rendezvous server (same as punch-rendezvous). SIGTERM: stop "
        "accepting, tell every registered peer 'shutting-down', exit 0 within a few seconds.",
    )
    _rendezvous_arguments(rendezvous)
    _relay_process_arguments(
        commands.add_parser(
            "relay",
            help="run a relay alone (same as punch-relay)",
            description=RELAY_DESCRIPTION,
        )
    )
    show_id = commands.add_parser(
        "id",
        help="print our peer ID (to give to peers for --peer-id)",
        description="Print the peer ID of our key, creating the key if it is missing.",
    )
    _identity_argument(show_id)
    from ._natcheck_cli import NATCHECK_DESCRIPTION, natcheck_arguments  # it imports us

    natcheck_arguments(
        commands.add_parser(
            "natcheck",
            help="measure our NAT through the rendezvous (RFC 4787 mapping, allocation, filtering)",
            description=NATCHECK_DESCRIPTION,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def _peer_id(text: str) -> str:
    try:
        return check_peer_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _identity(parser: argparse.ArgumentParser, path: Path | None) -> Identity:
    path = path or default_identity_path()
    try:
        return Identity.load_or_create(path)
    except (OSError, ValueError) as exc:
        parser.error(f"--identity {path}: {exc}")


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    """The frozen :class:`Options`, with every check argparse cannot make one argument at a
    time; each failed check is a usage error (exit 2). ``args`` is left as parsed."""
    host = args.rendezvous[0]
    version = _literal_version(host)
    family = socket.AF_INET6 if args.ipv6 else socket.AF_INET if args.ipv4 else None
    if family is not None and version is not None and version != (6 if args.ipv6 else 4):
        parser.error(f"--rendezvous {host} is IPv{version}, but -{6 if args.ipv6 else 4} was given")
    if args.local is not None:
        if family is not None and args.local.family != family:
            parser.error(f"--local {args.local} is not of the family -4/-6 asks for")
        if version is not None and (args.local.address.version == 6) != (version == 6):
            parser.error(f"--local {args.local} is not of the rendezvous's address family")
        family = args.local.family
    if not MIN_STAGGER <= args.stagger <= MAX_STAGGER:
        parser.error(f"--stagger must be {MIN_STAGGER:g}-{MAX_STAGGER:g} s, not {args.stagger:g}")
    if args.relay_stagger > MAX_RELAY_DELAY:
        parser.error(f"--relay-stagger must be at most {MAX_RELAY_DELAY:g} s")
    context = tls_client_context(parser, args)
    specific = {
        field.name: getattr(args, field.name)
        for field in attrs.fields(Options)
        if field.default is not attrs.NOTHING and hasattr(args, field.name)
    }
    options = Options(
        command=args.command,
        name=args.name,
        rendezvous=args.rendezvous,
        local=args.local,
        family=family,
        timeout=args.timeout,
        token=_token(parser, args.token_file),
        ssl_context=context,
        json=args.json,
        verbose=args.verbose,
        identity=_identity(parser, args.identity_file),
        **specific,
    )
    if args.peer_id is not None and not args.encrypt:
        parser.error("--peer-id needs encryption: only TLS proves a peer's key")
    problem = COMMANDS[args.command].check(options)
    if problem is not None:
        parser.error(problem)
    return options


def tls_client_context(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> ssl.SSLContext | None:
    """The client context ``--tls`` / ``--tls-ca`` ask for; a usage error if unreadable."""
    if not (args.tls or args.tls_ca):
        return None
    try:
        return ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f"--tls-ca {args.tls_ca}: {exc}")


def tls_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls`` and ``--tls-ca``, for :func:`tls_client_context`."""
    parser.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS to the rendezvous, checking its certificate against the system CAs",
    )
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="like --tls, trusting the CA(s) in FILE (PEM)"
    )


def _token(parser: argparse.ArgumentParser, path: Path | None) -> str | None:
    """The token in ``path``, stripped; a usage error if unreadable or empty."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--token-file {path}: {exc}")
    if not 0 < len(token) <= MAX_TOKEN:
        parser.error(f"--token-file {path}: the token must be 1-{MAX_TOKEN} characters")
    return token


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _probe_port(text: str) -> int | str:
    if text == "off":
        return text
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535 or off, not {text!r}")
    return int(text)


def _rendezvous_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerLimits()
    parser.add_argument(
        "--listen",
        type=_endpoint,
        action="append",
        metavar="IP:PORT",
        help="where to listen, repeatable (default 0.0.0.0:7000; [::]:7000 alone serves "
        "IPv6 and IPv4 where the OS allows; port 0 picks one); each bound IP:PORT is "
        "printed on stdout, one a line",
    )
    parser.add_argument(
        "--probe-port",
        type=_probe_port,
        metavar="PORT|off",
        help="also listen on this port of every --listen address, for 'punch natcheck' "
        "(default the first --listen port + 1; 0 picks one; off: none)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    _relay_arguments(parser)
    limits = parser.add_argument_group(
        "limits", "each refusal is an error frame with the code in brackets, then a close"
    )
    for flag, kind, metavar, text in (
        ("--max-frame", _count, "BYTES", "largest frame, 1024-4096 [frame-too-large]"),
        (
            "--registration-timeout",
            _seconds,
            "SECONDS",
            "accept to registered, TLS included [registration-timeout]",
        ),
        (
            "--idle-timeout",
            _seconds,
            "SECONDS",
            "drop a registered peer silent this long, 3..86400; "
            "peers are told and keep alive at a third of it [idle-timeout]",
        ),
        (
            "--max-connections-per-ip",
            _count,
            "N",
            "concurrent connections from one source IP [too-many-connections]",
        ),
        ("--max-peers", _count, "N", "registered peers at once [server-full]"),
        (
            "--registrations-per-minute",
            _count,
            "N",
            "registrations from one source IP in any 60 s [rate-limited]",
        ),
        (
            "--introductions-per-minute",
            _count,
            "N",
            "introductions one peer may ask for in any 60 s [rate-limited]",
        ),
    ):
        dest = flag[2:].replace("-", "_")
        limits.add_argument(
            flag,
            type=kind,
            default=getattr(defaults, dest),
            metavar=metavar,
            help=f"{text} (default {getattr(defaults, dest):g})",
        )
    limits.add_argument(
        "--allow",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="exempt these sources from the per-IP limits, like loopback (repeatable)",
    )
    limits.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="peers must present the token in FILE [unauthorized]",
    )
    parser.add_argument(
        "--persist-names",
        type=Path,
        metavar="FILE",
        help="bind each name to the key that first registered it, for good "
        "(trust on first use; JSON lines, appended); default: only while its holder is connected",
    )
    cluster = parser.add_argument_group(
        "cluster", "several processes and machines sharing one registry in Redis"
    )
    cluster.add_argument(
        "--redis",
        metavar="URL",
        help="share the registry with every server given this Redis "
        "(redis://HOST:PORT/DB, rediss:// for TLS, unix:///PATH): names unique across them, "
        "registrations per source counted across them, introductions between them; "
        "--persist-names then binds names in Redis (its FILE is unused)",
    )
    cluster.add_argument(
        "--redis-prefix",
        default="punch",
        metavar="PREFIX",
        help="prefix of the cluster's Redis keys and channels (default punch)",
    )
    cluster.add_argument(
        "--workers",
        type=_count,
        default=1,
        metavar="N",
        help="run N server processes on the same ports (SO_REUSEPORT), sharing --redis "
        "(needs --redis and fixed ports; a dead worker is restarted)",
    )
    cluster.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    tls = parser.add_argument_group("TLS", "serve the control channel over TLS (RFC 8445 §19.2)")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE", help="certificate chain (PEM)")
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")


def _relay_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RelayLimits()
    relay = parser.add_argument_group(
        "relay",
        "splice two peers' streams where no direct path exists (RFC 8445 relayed candidate); "
        "payload unread, the peers' own TLS. A refused Bind gets the code in brackets; a "
        "stream over a byte or time bound is reset",
    )
    relay.add_argument(
        "--relay",
        action="store_true",
        help="run the relay (default off); every relayed "
        "byte crosses this host twice: provision the bandwidth",
    )
    relay.add_argument(
        "--relay-port",
        type=_probe_port,
        metavar="PORT",
        help="its TCP port on every --listen address (default the first --listen port + 2; "
        "0 picks one)",
    )
    relay.add_argument(
        "--relay-at",
        type=_endpoint,
        metavar="IP:PORT",
        help="announce a relay run elsewhere (punch-relay) instead of running one; "
        "needs --relay-secret-file",
    )
    _relay_limit_arguments(relay, defaults)


def _relay_limit_arguments(relay: Any, defaults: RelayLimits) -> None:
    relay.add_argument(
        "--relay-secret-file",
        type=Path,
        metavar="FILE",
        help="the grant secret shared by the rendezvous and its relay: at least 64 hex "
        "characters (openssl rand -hex 32); default a fresh one (a relay in this process)",
    )
    for flag, kind, text in (
        ("--relay-max-circuits", _count, "relayed streams at once [relay-full]"),
        ("--relay-max-circuits-per-peer", _count, "relayed streams of one peer [peer-limit]"),
        ("--relay-max-bytes-per-circuit", _size, "bytes one stream carries, both ways; then reset"),
        (
            "--relay-max-bytes-per-peer-hour",
            _size,
            "bytes a peer's streams carry in a clock hour [peer-quota]; then reset",
        ),
        ("--relay-rate", _size, "bytes/s each direction of a stream (token bucket)"),
        ("--relay-max-lifetime", _seconds, "seconds a stream lasts; then reset"),
        (
            "--relay-bind-timeout",
            _seconds,
            "seconds a bound peer waits for the other [bind-timeout]",
        ),
    ):
        dest = flag[len("--relay-") :].replace("-", "_")
        default = getattr(defaults, dest)
        relay.add_argument(
            flag,
            dest=f"relay_{dest}",
            type=kind,
            default=default,
            metavar="SECONDS" if kind is _seconds else "N" if kind is _count else "BYTES",
            help=f"{text} (default {_sized(default) if kind is _size else f'{default:g}'})",
        )


def _sized(value: int) -> str:
    """Bytes the way ``_size`` reads them: ``1G``, ``512K``."""
    for unit in ("T", "G", "M", "K"):
        if value % _SIZE_UNITS[unit] == 0:
            return f"{value // _SIZE_UNITS[unit]}{unit}"
    return str(value)


def _relay_state(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Relay:
    """The :class:`Relay` the flags ask for: its limits and secret; a usage error if bad."""
    limits = RelayLimits(
        **{
            field.name: getattr(args, f"relay_{field.name}")
            for field in attrs.fields(RelayLimits)
            if hasattr(args, f"relay_{field.name}")
        }
    )
    secret = None
    if args.relay_secret_file is not None:
        try:
            secret = bytes.fromhex(args.relay_secret_file.read_text().strip())
        except (OSError, ValueError) as exc:
            parser.error(f"--relay-secret-file: {exc}")
        if len(secret) < 32:
            parser.error("--relay-secret-file: at least 32 bytes (64 hex characters)")
    return Relay(limits, secret)


def _relay_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, listen: list[Endpoint]
) -> tuple[int | None, Relay | None]:
    """The relay port (None: none here) and the relay (None: none at all)."""
    relay = _relay_state(parser, args)
    if args.relay_at is not None:
        if args.relay or args.relay_port is not None:
            parser.error("--relay-at announces a relay elsewhere: no --relay, --relay-port")
        if args.relay_secret_file is None:
            parser.error("--relay-at needs --relay-secret-file (that relay's secret)")
        return None, relay
    if not args.relay:
        if args.relay_port is not None:
            parser.error("--relay-port needs --relay")
        return None, None
    port = args.relay_port
    if port == "off":
        parser.error("--relay-port takes a port; leave --relay out for none")
    if port is None:
        port = listen[0].port and listen[0].port + 2
        if port > 65535:
            parser.error(f"--listen port {listen[0].port} has no port + 2: give --relay-port")
    return int(port), relay


def _server_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[ServerLimits, ssl.SSLContext | None]:
    """The limits and TLS context the flags ask for; a usage error if they cannot be met."""
    try:
        limits = ServerLimits(
            max_frame=args.max_frame,
            registration_timeout=args.registration_timeout,
            idle_timeout=args.idle_timeout,
            max_connections_per_ip=args.max_connections_per_ip,
            exempt=(*LOOPBACK, *args.allow),
            max_peers=args.max_peers,
            registrations_per_minute=args.registrations_per_minute,
            introductions_per_minute=args.introductions_per_minute,
            token=_token(parser, args.token_file),
        )
    except ValueError as exc:
        parser.error(str(exc))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    context = None
    if args.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--tls-cert/--tls-key: {exc}")
    return limits, context


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
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command == "rendezvous":
        return _serve(parser, args, argv[argv.index("rendezvous") + 1 :])
    if args.command == "relay":
        return _serve_relay(parser, args)
    if args.command == "id":
        print(_identity(parser, args.identity_file).peer_id)
        return EXIT_OK
    if args.command == "natcheck":
        from ._natcheck_cli import run_natcheck

        return run_natcheck(parser, args)
    options = _options(parser, args)
    report = Reporter(options.json)
    _logging([logging.WARNING, logging.INFO, logging.DEBUG][min(options.verbose, 2)], report)
    try:
        _run(_session, options, report)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (OSError, ValueError, TransferError, trio.BrokenResourceError) as exc:
        code, text = _failure(exc)
        attempts = [a.as_json() for a in getattr(exc, "attempts", ())]
        probes = getattr(exc, "probes", None)
        probes = probes.as_json() if probes is not None else None
        report("error", f"error: {text}", code=code, error=text, attempts=attempts, probes=probes)
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


def _raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    limits, context = _server_options(parser, args)
    listen = args.listen or [Endpoint("0.0.0.0", 7000)]
    probe_port = args.probe_port
    if probe_port is None:  # the first port + 1; with port 0, one the kernel picks
        probe_port = listen[0].port and listen[0].port + 1
        if probe_port > 65535:
            parser.error("--listen port 65535 has no port + 1: give --probe-port")
    relay_port, relay = _relay_options(parser, args, listen)
    bound: list[Endpoint] = []
    _logging(logging.WARNING if args.quiet else logging.INFO)
    _raise_fd_limit()
    if args.workers > 1:
        _check_workers(parser, args, listen, probe_port, relay_port)
        supervise = functools.partial(
            _workers.supervise, _workers.worker_argv(argv), args.workers, len(listen)
        )
        return _run_server("punch-rendezvous", supervise, listen)

    async def run() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                serve = functools.partial(
                    serve_rendezvous,
                    listen=listen,
                    bound=bound,
                    limits=limits,
                    ssl_context=context,
                    stop=stop,
                    persist_names=args.persist_names,
                    probe_port=None if probe_port == "off" else probe_port,
                    relay_port=relay_port,
                    relay=relay,
                    relay_at=args.relay_at,
                    redis=args.redis,
                    redis_prefix=args.redis_prefix,
                    reuse_port=args.reuse_port,
                )
                await nursery.start(serve)
                print(*bound, sep="\n", flush=True)
                async for signum in signals:
                    logging.getLogger("punch.server").info(
                        "%s: stopping", signal.Signals(signum).name
                    )
                    stop.set()
                    break

    return _run_server("punch-rendezvous", run, listen)


def _check_workers(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    listen: list[Endpoint],
    probe_port: int | str,
    relay_port: int | None,
) -> None:
    """Usage errors for ``--workers`` that a worker could only find too late."""
    if args.redis is None:
        parser.error("--workers needs --redis: the workers share their registry there")
    if any(e.port == 0 for e in listen) or probe_port == 0:
        parser.error("--workers needs fixed ports: each worker binds the same ones")
    if relay_port is not None:
        parser.error(
            "--workers with --relay: a relayed pair must bind to one process; "
            "run punch-relay and give --relay-at"
        )


def _run_server(program: str, run: Any, listen: list[Endpoint]) -> int:
    """``trio.run(run)`` for a server command: its exit code, and a line for why not 0."""
    try:
        _run(run)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        where = ", ".join(map(str, listen))
        print(f"{program}: cannot listen on {where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, ClusterUnavailable, RuntimeError) as exc:
        # a --persist-names file that is not ours, no Redis, a worker that did not start
        print(f"{program}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def rendezvous_main(argv: list[str] | None = None) -> int:
    """``punch-rendezvous --listen IP:PORT``. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="punch-rendezvous",
        description="The punch rendezvous server. SIGTERM: stop accepting, tell every "
        "registered peer 'shutting-down', exit 0 within a few seconds.",
    )
    _rendezvous_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return _serve(parser, parser.parse_args(argv), argv)


RELAY_DESCRIPTION = (
    "A punch relay on its own, for a rendezvous elsewhere that announces it "
    "(punch-rendezvous --relay-at IP:PORT) with the same --relay-secret-file. SIGTERM or "
    "Ctrl-C: stop."
)


def _relay_process_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=_endpoint,
        action="append",
        metavar="IP:PORT",
        help="where to listen, repeatable (default 0.0.0.0:7002); each bound IP:PORT is "
        "printed on stdout, one a line",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument(
        "--max-connections-per-ip",
        type=_count,
        default=ServerLimits().max_connections_per_ip,
        metavar="N",
        help="concurrent connections from one source IP [too-many-connections]",
    )
    parser.add_argument(
        "--allow",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="exempt these sources from the per-IP limit, like loopback (repeatable)",
    )
    _relay_limit_arguments(
        parser.add_argument_group("relay", "as punch-rendezvous --relay"), RelayLimits()
    )


def _serve_relay(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.relay_secret_file is None:
        parser.error("--relay-secret-file is required: the rendezvous mints grants with it")
    state = _relay_state(parser, args)
    limits = ServerLimits(
        max_connections_per_ip=args.max_connections_per_ip, exempt=(*LOOPBACK, *args.allow)
    )
    listen = args.listen or [Endpoint("0.0.0.0", 7002)]
    bound: list[Endpoint] = []
    _logging(logging.WARNING if args.quiet else logging.INFO)
    _raise_fd_limit()

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(serve_relay, listen, state, limits=limits, bound=bound)
                )
                print(*bound, sep="\n", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    return _run_server("punch-relay", run, listen)


def relay_main(argv: list[str] | None = None) -> int:
    """``punch-relay --listen IP:PORT --relay-secret-file FILE``. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="punch-relay", description=RELAY_DESCRIPTION)
    _relay_process_arguments(parser)
    return _serve_relay(parser, parser.parse_args(argv))
