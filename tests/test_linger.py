"""A dial cancelled mid simultaneous open leaves its 4-tuple free (netns, root).

trio's ``connect`` closes the socket itself when cancelled; a plain close of a
socket in SYN_RECV sends a FIN and parks it in FIN_WAIT1 (tcp(7)), which holds
the 4-tuple, so the race's next dial to that candidate got ``EADDRNOTAVAIL``.
The loopback of a fresh namespace drops SYN-ACKs and RSTs, which freezes a
simultaneous open in SYN_RECV long enough to cancel it there.
"""

from __future__ import annotations

import errno

import pytest
from netns.lab import missing_requirements

from tests.helpers import probe_in_namespace

REASON = missing_requirements()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

FREEZE = (
    "table inet freeze {\n"
    "  chain out {\n"
    "    type filter hook output priority 0;\n"
    "    tcp flags & (syn | ack) == syn | ack drop\n"
    "    tcp flags & rst == rst drop\n"
    "  }\n"
    "}\n"
)


def test_a_dial_cancelled_in_syn_recv_aborts_and_frees_its_4_tuple() -> None:
    report = probe_in_namespace("linger", FREEZE, "tests.linger_probe", "40001", "40002")
    assert report["state_after_cancel"] is None  # aborted, not FIN_WAIT1 ("04")
    assert report["redial_errno"] == errno.EINPROGRESS  # not EADDRNOTAVAIL
