"""What NAT is in front of us, measured through the rendezvous (``punch natcheck``).

RFC 4787 names the behaviours; the rendezvous shows them from two ports of
one address, its control port and its probe port (``punch-rendezvous
--probe-port``, :func:`punch.serve_rendezvous`'s ``probe_port``):

- **mapping** (§4.1): one local port's endpoint as the control port sees it
  and as the probe port sees it. The same: endpoint-independent (as far as
  two ports of one address can tell); different: endpoint-dependent
  ("symmetric"), and the endpoint a rendezvous reports is useless to peers.
- **port preservation** (§4.1): the control port sees our local port.
- **allocation**: the ports that :data:`DEFAULT_PROBES` new connections, each
  from a new local port, are given: the local ports themselves (preserving),
  a constant step Δ (sequential: the next mapping is predictable), or none
  (random). That is p2pd's classification of delta types, minus its
  dependent kind, which needs several server addresses.
- **filtering** (§5): from the probe port, the server dials the endpoint of
  a local port that only ever spoke to its control port. A NAT that lets it
  in filters by address at most (endpoint-independent or address-dependent:
  one server address cannot tell them apart); one that drops, resets or
  answers with ICMP filters by address and port.

Nothing here is a punch: every connection goes to the rendezvous, and every
socket is closed when :func:`natcheck` returns or raises.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import time
from typing import Any

import attrs
import trio

from . import reuse
from ._control import ControlChannel, connect_control
from ._endpoint import Endpoint, as_endpoint
from ._errors import RemoteProtocolError, RendezvousError
from ._nat import Allocation, Filtering, Mapping, NatFacts, classify_allocation
from ._protocol import Challenge, Error, Probed, Reach, Reached, RendezvousConnection, Side

log = logging.getLogger("punch.host")

DEFAULT_PROBES = 8
"""New mappings :func:`natcheck` asks for to classify allocation (issue 16: at least 8)."""
MIN_PROBES = 3
MAX_PROBES = 64
DEFAULT_TIMEOUT = 10.0
"""Seconds the whole check may take by default."""


@attrs.frozen
class NatReport:
    """What :func:`natcheck` measured.

    Attributes:
        local: the local endpoint the main probes came from (a host candidate).
        observed: its endpoint as the rendezvous's control port saw it (the
            server-reflexive candidate a registration would get).
        observed_probe: the same local port's endpoint as the probe port saw it.
        mapping: :class:`Mapping`: ``observed`` and ``observed_probe`` compared.
        port_preserving: ``observed`` kept our local port.
        allocation: :class:`Allocation` of the new mappings (``ports``).
        step: Δ in ports when ``allocation`` is sequential, 0 when preserving,
            else ``None``.
        local_ports: the local port of each new mapping, in order.
        ports: the public port each got, in order.
        filtering: :class:`Filtering`.
        filtering_outcome: the server's dial as it told it: ``"connected"``,
            ``"timed out"``, ``"refused"``, an errno name, or why it did not dial.
        elapsed: seconds the check took.
    """

    local: Endpoint
    observed: Endpoint
    observed_probe: Endpoint
    mapping: Mapping
    port_preserving: bool
    allocation: Allocation
    step: int | None
    local_ports: tuple[int, ...]
    ports: tuple[int, ...]
    filtering: Filtering
    filtering_outcome: str
    elapsed: float

    @property
    def behind_nat(self) -> bool:
        """The rendezvous saw another address than ours."""
        return self.observed.address != self.local.address

    def to_json(self) -> dict[str, Any]:
        """The report as JSON types (``punch natcheck --json``)."""
        return {
            "local": str(self.local),
            "observed": str(self.observed),
            "observed_probe": str(self.observed_probe),
            "behind_nat": self.behind_nat,
            "mapping": self.mapping.value,
            "port_preserving": self.port_preserving,
            "allocation": self.allocation.value,
            "step": self.step,
            "local_ports": list(self.local_ports),
            "ports": list(self.ports),
            "filtering": self.filtering.value,
            "filtering_outcome": self.filtering_outcome,
            "elapsed": round(self.elapsed, 4),
        }

    def describe(self) -> str:
        """The report for people, one fact a line (``punch natcheck``)."""
        step = f" (step {self.step:+d})" if self.allocation is Allocation.SEQUENTIAL else ""
        seen = "the same" if self.observed == self.observed_probe else str(self.observed_probe)
        return "\n".join(
            [
                f"local endpoint:    {self.local}",
                f"public endpoint:   {self.observed} (control port); {seen} (probe port)"
                + ("" if self.behind_nat else ", no NAT"),
                f"mapping:           {self.mapping.value} (RFC 4787 §4.1)",
                f"port preservation: {'yes' if self.port_preserving else 'no'}",
                f"allocation:        {self.allocation.value}{step}: ports "
                + " ".join(map(str, self.ports)),
                f"filtering:         {self.filtering.value} (RFC 4787 §5; "
                f"the server's dial: {self.filtering_outcome})",
                f"verdict:           {self.verdict()}",
            ]
        )

    def verdict(self) -> str:
        """What a punch can expect from this side, in one line."""
        if not self.behind_nat:
            return "no NAT on the way to the rendezvous: peers can punch to us, or dial us"
        if self.mapping is Mapping.ENDPOINT_INDEPENDENT:
            return "a cone NAT: punching works against any peer that has a direct path"
        if self.allocation is Allocation.SEQUENTIAL:
            return (
                "a symmetric NAT with sequential ports: direct to a public peer, "
                "and to a cone peer, which predicts our next ports"
            )
        return (
            "a symmetric NAT with random ports: direct to a public peer, and to a "
            "cone peer by birthday punching (a second or two); none to another symmetric NAT"
        )


async def natcheck(
    rendezvous: Endpoint | tuple[str, int] | str,
    *,
    probe_port: int | None = None,
    local: Endpoint | tuple[str, int] | str | None = None,
    probes: int = DEFAULT_PROBES,
    timeout: float = DEFAULT_TIMEOUT,
    rendezvous_ssl_context: ssl.SSLContext | None = None,
    rendezvous_hostname: str | None = None,
) -> NatReport:
    """Measure the NAT between us and the rendezvous (see the module for how).

    Opens ``probes`` + 3 TCP connections to the rendezvous, one after another
    (two to its control port, the rest to its probe port), and no other; no
    registration, no name.

    Args:
        rendezvous: the server's control endpoint (:class:`Endpoint`,
            ``(ip, port)`` or ``"ip:port"``).
        probe_port: its probe port (default: the control port + 1, as
            ``punch-rendezvous`` listens by default).
        local: the endpoint to bind for the main probes (default: any address
            of the rendezvous's family, a port the kernel chooses).
        probes: new mappings to classify allocation with,
            :data:`MIN_PROBES`..:data:`MAX_PROBES` (default 8).
        timeout: seconds (> 0) for the whole check (default 10).
        rendezvous_ssl_context, rendezvous_hostname: as :func:`punch.open_host`
            (TLS to the control port; the probe port is plain TCP).

    Returns:
        a :class:`NatReport`.

    Raises:
        TypeError, ValueError: a bad argument.
        RendezvousError: code ``"unreachable"`` (either port), ``"timeout"``,
            ``"protocol-error"`` or ``"closed"``, or the server's own code.
        OSError: ``local`` cannot be bound.
    """
    server = as_endpoint(rendezvous, "rendezvous")
    probe = Endpoint(server.ip, server.port + 1 if probe_port is None else probe_port)
    if not isinstance(probes, int) or not MIN_PROBES <= probes <= MAX_PROBES:
        raise ValueError(f"probes must be {MIN_PROBES}..{MAX_PROBES}, not {probes!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be seconds > 0, not {timeout!r}")
    any_address = _any_address(server)
    first = as_endpoint(local, "local") if local is not None else any_address
    check = _Check(server, probe, rendezvous_ssl_context, rendezvous_hostname or server.ip)
    started = time.monotonic()
    try:
        with trio.fail_after(timeout):
            return await check.run(first, any_address, probes, started)
    except trio.TooSlowError:
        raise RendezvousError("timeout", f"no NAT check within {timeout:g} s") from None
    except RemoteProtocolError as exc:
        raise RendezvousError("protocol-error", f"rendezvous sent garbage: {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise RendezvousError("closed", f"connection lost: {exc}") from exc


def _any_address(server: Endpoint) -> Endpoint:
    """Any local address of ``server``'s family, a port the kernel picks."""
    return Endpoint("::" if server.family == socket.AF_INET6 else "0.0.0.0", 0)


@attrs.define
class _Check:
    server: Endpoint
    probe: Endpoint
    ssl_context: ssl.SSLContext | None
    hostname: str

    async def run(
        self, first: Endpoint, any_address: Endpoint, probes: int, started: float
    ) -> NatReport:
        local, observed = await self._observed_by_control_port(first)
        port = await self._connect_probe(local)
        async with port.stream:
            observed_probe = await self._probed(port)
            filtering, outcome = await self._filtering(port, any_address)
        local_ports, ports = [], []
        for _ in range(probes):
            fresh = await self._connect_probe(any_address)
            async with fresh.stream:
                local_ports.append(Endpoint.from_sockaddr(fresh.socket.getsockname()).port)
                ports.append((await self._probed(fresh)).port)
        allocation, step = classify_allocation(local_ports, ports)
        same = observed == observed_probe
        return NatReport(
            local=local,
            observed=observed,
            observed_probe=observed_probe,
            mapping=Mapping.ENDPOINT_INDEPENDENT if same else Mapping.ENDPOINT_DEPENDENT,
            port_preserving=observed.port == local.port,
            allocation=allocation,
            step=step,
            local_ports=tuple(local_ports),
            ports=tuple(ports),
            filtering=filtering,
            filtering_outcome=outcome,
            elapsed=time.monotonic() - started,
        )

    async def _observed_by_control_port(self, local: Endpoint) -> tuple[Endpoint, Endpoint]:
        """Our bound endpoint and the one the control port's Challenge tells."""
        channel = await connect_control(
            local, self.server, math.inf, self.ssl_context, self.hostname
        )
        async with channel.stream:
            bound = Endpoint.from_sockaddr(channel.socket.getsockname())
            challenge = await channel.receive()
        if isinstance(challenge, Error):
            raise RendezvousError(challenge.code, challenge.text)
        if not isinstance(challenge, Challenge) or challenge.observed is None:
            raise RendezvousError("closed", f"{self.server} told no observed endpoint")
        return bound, challenge.observed

    async def _filtering(
        self, port: ControlChannel, any_address: Endpoint
    ) -> tuple[Filtering, str]:
        """Ask the probe port to dial a new local port's mapping, made by the control port only."""
        listener = reuse.open_listener(any_address)  # what the server's SYN must find
        async with listener:
            here = Endpoint.from_sockaddr(listener.socket.getsockname())
            _, mapped = await self._observed_by_control_port(here)
            await port.send(Reach(mapped))
            answer = await port.receive()
        if isinstance(answer, Reached):
            if answer.reached:
                return Filtering.ADDRESS_DEPENDENT, answer.outcome
            return Filtering.ADDRESS_AND_PORT_DEPENDENT, answer.outcome
        if isinstance(answer, Error):
            return Filtering.UNKNOWN, f"not tried: {answer.code}: {answer.text}"[:200]
        return Filtering.UNKNOWN, "the probe port closed"

    async def _connect_probe(self, local: Endpoint) -> ControlChannel:
        sock = reuse.bind_reusable(local)
        try:
            await sock.connect(self.probe.sockaddr())
        except OSError as exc:
            reuse.abort(sock)
            raise RendezvousError(
                "unreachable",
                f"cannot reach the probe port {self.probe} ({exc.strerror or exc}); "
                "does the rendezvous run with --probe-port?",
            ) from exc
        except BaseException:
            reuse.abort(sock)
            raise
        connection = RendezvousConnection(Side.CLIENT, probe=True)
        return ControlChannel(trio.SocketStream(sock), sock, connection)

    async def _probed(self, channel: ControlChannel) -> Endpoint:
        message = await channel.receive()
        if isinstance(message, Error):
            raise RendezvousError(message.code, message.text)
        if not isinstance(message, Probed):
            raise RendezvousError("closed", f"the probe port {self.probe} closed")
        return message.observed


REPORT_TIMEOUT = 5.0
"""Seconds a host gives its two registration probes (:func:`registration_facts`)."""


async def registration_facts(
    local: Endpoint, observed: Endpoint, server: Endpoint, probe_port: int | None = None
) -> NatFacts | None:
    """What a host tells the rendezvous of its NAT (``Report``), from two probes.

    One connection to the probe port from ``local`` (the port the control
    connection holds: the mapping, compared with ``observed``), one from a new
    port (one more allocation). Unlike :func:`natcheck`: no filtering test,
    two probes, and never an error: ``None`` when the probe port does not
    answer in :data:`REPORT_TIMEOUT` s (an older or ``--probe-port off`` server).

    Args:
        local: the control connection's local endpoint.
        observed: its endpoint as the control port saw it (``Registered``).
        server: the control port; ``probe_port`` as :func:`natcheck`.
    """
    probe = Endpoint(server.ip, server.port + 1 if probe_port is None else probe_port)
    check = _Check(server, probe, None, server.ip)
    any_address = _any_address(server)
    try:
        with trio.fail_after(REPORT_TIMEOUT):
            same = await check._connect_probe(local)
            async with same.stream:
                mapped = await check._probed(same)
            fresh = await check._connect_probe(any_address)
            async with fresh.stream:
                fresh_local = Endpoint.from_sockaddr(fresh.socket.getsockname())
                fresh_mapped = await check._probed(fresh)
    except (
        OSError,  # RendezvousError among them
        RemoteProtocolError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    ) as exc:
        log.info("no NAT facts to report: %s", exc)
        return None
    if mapped == observed:  # endpoint-independent: the probe reused the control's mapping
        local_ports, ports = [local.port, fresh_local.port], [observed.port, fresh_mapped.port]
        mapping = Mapping.ENDPOINT_INDEPENDENT
    else:
        local_ports = [local.port, local.port, fresh_local.port]
        ports = [observed.port, mapped.port, fresh_mapped.port]
        mapping = Mapping.ENDPOINT_DEPENDENT
    allocation, step = classify_allocation(local_ports, ports)
    return NatFacts(mapping, observed.port == local.port, allocation, step, tuple(ports))
