"""``punch natcheck``: :func:`punch.natcheck` from the command line."""

from __future__ import annotations

import argparse
import json
import sys

import trio

from ._cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RENDEZVOUS,
    _endpoint,
    _host_port,
    _resolve,
    _seconds,
    tls_client_arguments,
    tls_client_context,
)
from ._errors import RendezvousError
from ._natcheck import DEFAULT_PROBES, DEFAULT_TIMEOUT, MAX_PROBES, MIN_PROBES, NatReport, natcheck

NATCHECK_DESCRIPTION = """\
Measure the NAT between us and the rendezvous, in RFC 4787's terms: its mapping
(one local port's public endpoint as the rendezvous's control port and its probe
port see it), port preservation, how it allocates ports to new mappings (from
--probes new connections), and its filtering (the probe port dials a mapping
that only the control port has seen). The rendezvous must listen on its probe
port (punch-rendezvous --probe-port; by default its port + 1). No name, no
registration: only connections to the rendezvous."""


def natcheck_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``punch natcheck``."""
    parser.add_argument(
        "--rendezvous",
        required=True,
        type=_host_port,
        metavar="HOST:PORT",
        help="the rendezvous server: an IP ([IPv6] in brackets) or a DNS name",
    )
    parser.add_argument(
        "--probe-port",
        type=int,
        metavar="PORT",
        help="the rendezvous's probe port (default its port + 1)",
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=DEFAULT_PROBES,
        metavar="N",
        help=f"new mappings to classify allocation with, {MIN_PROBES}-{MAX_PROBES} "
        f"(default {DEFAULT_PROBES})",
    )
    parser.add_argument(
        "--local", type=_endpoint, metavar="IP:PORT", help="bind here (default any, port 0)"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds for the whole check (default {DEFAULT_TIMEOUT:g})",
    )
    tls_client_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run_natcheck(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``punch natcheck``; print the report; return the exit code."""
    if not MIN_PROBES <= args.probes <= MAX_PROBES:
        parser.error(f"--probes must be {MIN_PROBES}-{MAX_PROBES}, not {args.probes}")
    if args.probe_port is not None and not 0 < args.probe_port < 65536:
        parser.error(f"--probe-port must be 1-65535, not {args.probe_port}")
    context = tls_client_context(parser, args)
    host, port = args.rendezvous

    async def check() -> NatReport:
        family = args.local.family if args.local is not None else None
        server = (await _resolve(host, port, family))[0]
        return await natcheck(
            server,
            probe_port=args.probe_port,
            local=args.local,
            probes=args.probes,
            timeout=args.timeout,
            rendezvous_ssl_context=context,
            rendezvous_hostname=host,
        )

    try:
        report = trio.run(check)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RendezvousError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RENDEZVOUS
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(report.to_json()) if args.json else report.describe(), flush=True)
    return EXIT_OK
