"""``punch.natcheck`` and the rendezvous's probe port, on loopback (no NAT: every
behaviour is the open one); through real NATs in :mod:`tests.test_natcheck_lab`."""

from __future__ import annotations

import itertools
import re
import socket
import struct
import subprocess
from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from netns.scenario import PUNCH, PairRun, wait_for

import punch
from punch import Allocation, CandidateType, Endpoint, Filtering, Mapping
from punch._control import ControlChannel
from punch._nat import (
    CONTIGUOUS_STEP,
    MAX_SEQUENTIAL_STEP,
    PREDICTION_WINDOW,
    NatFacts,
    classify_allocation,
    predict,
)
from punch._protocol import (
    ConnectRequest,
    Error,
    Introduction,
    Probed,
    Reach,
    Reached,
    Registered,
    RendezvousConnection,
    Report,
    Side,
)
from tests.helpers import open_fds, raw_client, register


def test_allocation_is_preserving_sequential_or_random() -> None:
    local = [40001, 40100, 40002, 40200]
    assert classify_allocation(local, local) == (Allocation.PRESERVING, 0)
    assert classify_allocation(local, [30000, 30001, 30002, 30003]) == (Allocation.SEQUENTIAL, 1)
    assert classify_allocation(local, [30000, 29998, 29996, 29994]) == (Allocation.SEQUENTIAL, -2)
    # a second LAN host's connection took two ports in between: still +1
    cross = [30000, 30001, 30004, 30005, 30006]
    assert classify_allocation([1, 2, 3, 4, 5], cross) == (Allocation.SEQUENTIAL, 1)
    assert classify_allocation(local, [51234, 30517, 44911, 60002]) == (Allocation.RANDOM, None)
    far = [30000, 30000 + MAX_SEQUENTIAL_STEP + 1, 30000 + 2 * (MAX_SEQUENTIAL_STEP + 1)]
    assert classify_allocation([1, 2, 3], far) == (Allocation.RANDOM, None)
    with pytest.raises(ValueError, match=">= 2"):
        classify_allocation([1], [2])
    with pytest.raises(ValueError, match="same number"):
        classify_allocation([1, 2], [3, 4, 5])


@given(st.lists(st.integers(1, 65535), min_size=2, max_size=64))
def test_a_step_is_reported_only_with_a_sequential_allocation(ports: list[int]) -> None:
    local = [p % 60000 + 1 for p in ports]  # other ports than the mapped ones, mostly
    allocation, step = classify_allocation(local, ports)
    if allocation is Allocation.SEQUENTIAL:
        assert step is not None
        assert 0 < abs(step) <= MAX_SEQUENTIAL_STEP
        steps = [b - a for a, b in itertools.pairwise(ports)]
        assert 2 * steps.count(step) >= len(steps)
    elif allocation is Allocation.RANDOM:
        assert step is None
    else:
        assert (step, local) == (0, ports)


async def serve(nursery: trio.Nursery, host: str = "127.0.0.1") -> tuple[Endpoint, Endpoint]:
    """A rendezvous with a probe port (both ports chosen by the kernel)."""
    probes: list[Endpoint] = []

    async def run(task_status: trio.TaskStatus[Endpoint]) -> None:
        await punch.serve_rendezvous(
            host, 0, probe_port=0, probe_bound=probes, task_status=task_status
        )

    control = await nursery.start(run)
    return control, probes[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_without_a_nat_every_behaviour_is_the_open_one(
    nursery: trio.Nursery, host: str
) -> None:
    control, probe = await serve(nursery, host)
    before = open_fds()
    report = await punch.natcheck(control, probe_port=probe.port, probes=4)
    await trio.testing.wait_all_tasks_blocked()  # the server's side has seen each close
    assert open_fds() == before  # every probe socket and listener is closed
    assert report.local.ip == host
    assert report.observed == report.observed_probe == report.local
    assert not report.behind_nat
    assert report.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert report.port_preserving
    assert report.allocation is Allocation.PRESERVING
    assert report.step == 0
    assert report.ports == report.local_ports
    assert len(report.ports) == 4
    assert (report.filtering, report.filtering_outcome) == (
        Filtering.ADDRESS_DEPENDENT,
        "connected",
    )
    assert 0 < report.elapsed < 10
    assert report.to_json()["mapping"] == "endpoint-independent"
    assert "no NAT" in report.describe()


async def test_a_rendezvous_without_a_probe_port_is_named_as_the_cause(
    nursery: trio.Nursery,
) -> None:
    control = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
    with pytest.raises(punch.RendezvousError, match="--probe-port") as failed:
        await punch.natcheck(control)  # its port + 1: nobody listens there
    assert failed.value.code == "unreachable"


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"probes": 2}, "probes must be"),
        ({"probes": 65}, "probes must be"),
        ({"timeout": 0}, "timeout must be"),
        ({"timeout": True}, "timeout must be"),
    ],
)
async def test_bad_arguments_are_refused_before_any_socket(
    arguments: dict[str, object], error: str
) -> None:
    before = open_fds()
    with pytest.raises(ValueError, match=error):
        await punch.natcheck("127.0.0.1:9", **arguments)  # type: ignore[arg-type]
    assert open_fds() == before


async def test_a_busy_server_leaves_filtering_unknown(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("punch._server.MAX_REACHES", 0)
    control, probe = await serve(nursery)
    report = await punch.natcheck(control, probe_port=probe.port, probes=3)
    assert report.filtering is Filtering.UNKNOWN
    assert report.filtering_outcome.startswith("not tried: busy")
    assert report.mapping is Mapping.ENDPOINT_INDEPENDENT  # the rest is measured all the same


async def probe_channel(probe: Endpoint) -> tuple[ControlChannel, Endpoint]:
    stream = await trio.open_tcp_stream(probe.ip, probe.port)
    channel = ControlChannel(stream, stream.socket, RendezvousConnection(Side.CLIENT, probe=True))
    probed = await channel.receive()
    assert isinstance(probed, Probed)
    return channel, probed.observed


async def test_the_probe_port_dials_only_the_address_the_probe_came_from(
    nursery: trio.Nursery,
) -> None:
    _, probe = await serve(nursery, "0.0.0.0")
    channel, observed = await probe_channel(Endpoint("127.0.0.1", probe.port))
    async with channel.stream:
        assert observed.ip == "127.0.0.1"
        await channel.send(Reach(Endpoint("127.0.0.2", 80)))  # another host: refused
        refusal = await channel.receive()
    assert isinstance(refusal, Error)
    assert refusal.code == "reach-elsewhere"


async def test_a_reach_to_a_closed_port_is_told_refused(nursery: trio.Nursery) -> None:
    _, probe = await serve(nursery)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        channel, _ = await probe_channel(probe)
        async with channel.stream:
            await channel.send(Reach(Endpoint("127.0.0.1", port)))
            assert await channel.receive() == Reached(False, "refused")
            assert await channel.receive() is None  # then the server closes


async def test_punch_natcheck_prints_the_report(nursery: trio.Nursery) -> None:
    control, probe = await serve(nursery)
    command = [*PUNCH, "natcheck", "--rendezvous", str(control), "--probe-port", str(probe.port)]
    text = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    as_json = await trio.run_process([*command, "--json", "--probes", "3"], capture_stdout=True)
    assert b"mapping:           endpoint-independent (RFC 4787" in text.stdout
    assert b'"allocation": "preserving"' in as_json.stdout
    refused = await trio.run_process(
        [*PUNCH, "natcheck", "--rendezvous", str(control), "--probes", "1"],
        capture_stderr=True,
        check=False,
    )
    assert refused.returncode == 2
    assert b"--probes must be 3-64" in refused.stderr
    unreachable = await trio.run_process(
        [*PUNCH, "natcheck", "--rendezvous", str(control)], capture_stderr=True, check=False
    )
    assert unreachable.returncode == 3
    assert b"--probe-port" in unreachable.stderr


# --- hostile lifecycles on the real binary's probe port --------------------------

ROUNDS = 30
LINGER_ABORT = struct.pack("ii", 1, 0)
"""``SO_LINGER`` 0: close with an RST."""


@pytest.fixture
def rendezvous_process() -> Iterator[tuple[Endpoint, Endpoint, subprocess.Popen[bytes]]]:
    pair = PairRun()
    try:
        address = pair.start_rendezvous(
            [], "127.0.0.1:0", "--probe-port", "0", "--registration-timeout", "3"
        )
        process = pair.processes[-1]
        log = wait_for(
            pair.workdir / "rendezvous.err",
            lambda t: "probe port listening on" in t,
            process,
            "probe port",
        )
        found = re.search(r"probe port listening on (\S+)", log)
        assert found
        yield Endpoint.parse(address), Endpoint.parse(found[1]), process
    finally:
        pair.close()


async def test_the_probe_port_survives_hostile_lifecycles(
    rendezvous_process: tuple[Endpoint, Endpoint, subprocess.Popen[bytes]],
) -> None:
    control, probe, process = rendezvous_process
    for _ in range(ROUNDS):  # connect and reset
        with socket.create_connection(probe.sockaddr(), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"P\x03\x00\x02{}", b"\x00" * 64):
        with socket.create_connection(probe.sockaddr(), timeout=5) as sock:
            sock.sendall(garbage)
    async with trio.open_nursery() as hostile:
        for _ in range(ROUNDS):  # ask for a dial, then reset before the answer
            hostile.start_soon(_reach_and_reset, probe)
    half_open = [socket.create_connection(probe.sockaddr(), timeout=5) for _ in range(5)]
    try:
        report = await punch.natcheck(control, probe_port=probe.port, probes=3)
    finally:
        for sock in half_open:
            sock.close()
    assert report.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert report.filtering is Filtering.ADDRESS_DEPENDENT
    assert process.poll() is None


async def _reach_and_reset(probe: Endpoint) -> None:
    channel, observed = await probe_channel(probe)
    await channel.send(Reach(Endpoint(observed.ip, 9)))
    channel.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    channel.socket.close()


# --- what a host reports as it registers, and who hears of it -----------------------


async def test_a_host_measures_its_nat_as_it_registers(nursery: trio.Nursery) -> None:
    control, probe = await serve(nursery)
    async with punch.open_host("alice", rendezvous=control, probe_port=probe.port) as host:
        facts = await host.measured_nat()
        assert facts is not None
        assert facts is host.nat
        assert facts.mapping is Mapping.ENDPOINT_INDEPENDENT
        assert facts.port_preserving
        assert facts.allocation is Allocation.PRESERVING
        assert facts.ports[0] == host.observed.port == host.local.port
        assert len(facts.ports) == 2  # its own port, and one new mapping
    async with punch.open_host("bob", rendezvous=control, probe_port=0) as quiet:
        assert await quiet.measured_nat() is None  # told not to probe


async def test_a_rendezvous_without_a_probe_port_gets_no_report(nursery: trio.Nursery) -> None:
    control = await nursery.start(punch.serve_rendezvous, "127.0.0.1", 0)
    async with punch.open_host("alice", rendezvous=control) as host:
        assert await host.measured_nat() is None  # port + 1: refused, quietly


FACTS = NatFacts(Mapping.ENDPOINT_DEPENDENT, False, Allocation.SEQUENTIAL, 1, (30000, 30001))


async def test_reported_facts_travel_in_the_other_peers_introduction(
    nursery: trio.Nursery,
) -> None:
    control, _ = await serve(nursery)
    async with raw_client(control) as asker, raw_client(control) as target:
        assert isinstance(await register(asker, "asker"), Registered)
        assert isinstance(await register(target, "target"), Registered)
        await asker.send(Report(FACTS))
        await asker.send(ConnectRequest("target", 1))
        to_asker, to_target = await asker.receive(), await target.receive()
    assert isinstance(to_asker, Introduction)
    assert isinstance(to_target, Introduction)
    assert to_target.peer_nat == FACTS  # the asker reported
    assert to_asker.peer_nat is None  # the target did not


def test_only_a_sequential_endpoint_dependent_nat_s_ports_are_predicted() -> None:
    srflx = Endpoint("203.0.113.11", 30000)
    predicted = predict(FACTS, srflx, window=4)
    assert [c.endpoint for c in predicted] == [
        Endpoint("203.0.113.11", p) for p in range(30002, 30006)
    ]
    assert {c.type for c in predicted} == {CandidateType.PREDICTED}
    assert str(predicted[0]) == "predicted 203.0.113.11:30002"
    down = attrs.evolve(FACTS, step=-2, ports=(3,))
    assert [c.endpoint.port for c in predict(down, srflx, window=4)] == [2, 1]  # not 0 or below
    # a small step may be other hosts' connections in between: every port on
    two = attrs.evolve(FACTS, step=2, ports=(30000, 30002))
    assert [c.endpoint.port for c in predict(two, srflx, window=3)] == [30003, 30004, 30005]
    wide = attrs.evolve(FACTS, step=CONTIGUOUS_STEP + 1, ports=(30000,))
    assert [c.endpoint.port for c in predict(wide, srflx, window=2)] == [
        30000 + CONTIGUOUS_STEP + 1,
        30000 + 2 * (CONTIGUOUS_STEP + 1),
    ]
    assert len(predict(FACTS, srflx)) == PREDICTION_WINDOW
    for facts in (
        None,
        attrs.evolve(FACTS, mapping=Mapping.ENDPOINT_INDEPENDENT),  # its srflx is its mapping
        attrs.evolve(FACTS, allocation=Allocation.RANDOM, step=None),
        attrs.evolve(FACTS, allocation=Allocation.PRESERVING, step=0),
    ):
        assert predict(facts, srflx) == ()
