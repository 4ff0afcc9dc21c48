"""A dial refused by an ICMP error keeps its socket, and its sequence; so does a
primed one (netns, root).

Linux's conntrack admits a later SYN of ours only within the window it tracked
for the refused one once the peer's SYN has met the entry (SYN_SENT2); a fresh
socket draws a fresh ISN, the kept one continues (:class:`punch.reuse.Redial`).
A fresh namespace's loopback, whose nft rule answers SYNs to one port with
ICMP port unreachable, stands for the peer's refusing NAT.
"""

from __future__ import annotations

import pytest
from netns.lab import missing_requirements

from punch.reuse import PRIME_TTL
from tests.helpers import probe_in_namespace

REASON = missing_requirements()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PORT_A, PORT_B = 40011, 40012
REFUSE = (
    "table inet refuse {\n"
    "  chain in {\n"
    "    type filter hook input priority 0;\n"
    f"    tcp dport {PORT_B} tcp flags & (syn | ack) == syn"
    " reject with icmp type port-unreachable\n"
    "  }\n"
    "}\n"
)
TCP_SYN_SENT = 2  # include/net/tcp_states.h


def test_an_icmp_refused_socket_is_kept_and_answers_the_peer_s_syn_itself() -> None:
    report = probe_in_namespace("redial", REFUSE, "tests.redial_probe", str(PORT_A), str(PORT_B))
    assert report["kept"] == [True, True]
    # The ICMP error came back within our own connect() call (loopback): a soft
    # error (tcp_v4_err, sk_err_soft), so the socket is still in SYN_SENT.
    assert report["states"] == [TCP_SYN_SENT, TCP_SYN_SENT]
    assert report["connected"] is True
    first, second = report["syns"]  # the peer's SYN made the open: no third SYN
    # the second attempt's SYN continues the first's sequence: disconnect adds 2
    assert second - first == 3


EXPIRE = (  # what the next router does with a priming SYN
    "table inet expire {\n"
    "  chain in {\n"
    "    type filter hook input priority 0;\n"
    f"    ip ttl < 3 tcp dport {PORT_B} drop\n"
    "  }\n"
    "}\n"
)


def test_a_primed_socket_is_ttl_limited_deaf_and_its_next_syn_continues_the_sequence() -> None:
    report = probe_in_namespace("prime", EXPIRE, "tests.prime_probe", str(PORT_A), str(PORT_B))
    assert report["kept"] is True
    assert report["ttl_after"] == 64  # the route's default again (sysctl ip_default_ttl)
    # deaf until the next dial: the peer's SYN did not move it to SYN_RECV
    assert report["state_after_peer_syn"] == TCP_SYN_SENT
    assert report["connected"] is True
    (primed, primed_ttl), (dialled, dialled_ttl) = report["syns"]
    assert (primed_ttl, dialled_ttl) == (PRIME_TTL, 64)
    assert dialled - primed == 3  # the same socket's next SYN: disconnect adds 2
    assert report["syn_acks"] == []  # our next SYN made the open, not an answer to theirs
