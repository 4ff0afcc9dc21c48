"""punch: direct TCP connections between peers behind NATs, by TCP simultaneous open.

Each peer listens and dials from one local ip:port; a rendezvous server
introduces two peers and tells each the other's candidates; a trio nursery
races accept against paced connects; the first stream to pass the
HMAC handshake and be nominated by the initiator wins, and TLS 1.3 with each
peer's registered Ed25519 key (:class:`Identity`) encrypts it::

    stream = await punch.connect("bob", rendezvous="203.0.113.10:7000", name="alice")
"""

from __future__ import annotations

from . import reuse as reuse
from ._birthday import ProbeReport as ProbeReport
from ._cluster import Cluster as Cluster
from ._cluster import ClusterUnavailable as ClusterUnavailable
from ._endpoint import Candidate as Candidate
from ._endpoint import CandidateType as CandidateType
from ._endpoint import Endpoint as Endpoint
from ._endpoint import Role as Role
from ._errors import CandidateFailed as CandidateFailed
from ._errors import HandshakeError as HandshakeError
from ._errors import HandshakeInterrupted as HandshakeInterrupted
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import NameTaken as NameTaken
from ._errors import PeerVerificationError as PeerVerificationError
from ._errors import ProtocolError as ProtocolError
from ._errors import PunchError as PunchError
from ._errors import PunchFailed as PunchFailed
from ._errors import RelayRefused as RelayRefused
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import RendezvousError as RendezvousError
from ._errors import ReuseUnavailable as ReuseUnavailable
from ._errors import SelfDialError as SelfDialError
from ._host import Host as Host
from ._host import connect as connect
from ._host import open_host as open_host
from ._identity import Identity as Identity
from ._identity import peer_id as peer_id
from ._nat import Allocation as Allocation
from ._nat import Filtering as Filtering
from ._nat import Mapping as Mapping
from ._natcheck import NatReport as NatReport
from ._natcheck import natcheck as natcheck
from ._outcome import Attempt as Attempt
from ._outcome import Outcome as Outcome
from ._race import PunchOptions as PunchOptions
from ._race import RelayMode as RelayMode
from ._relay import Relay as Relay
from ._relay import RelayLimits as RelayLimits
from ._server import ServerLimits as ServerLimits
from ._server import serve_relay as serve_relay
from ._server import serve_rendezvous as serve_rendezvous
from ._stream import PeerStream as PeerStream
from ._stream import StreamPath as StreamPath
from ._stream import WonBy as WonBy
from .reuse import reuse_available as reuse_available

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "Attempt",
    "Candidate",
    "CandidateFailed",
    "CandidateType",
    "Cluster",
    "ClusterUnavailable",
    "Endpoint",
    "Filtering",
    "HandshakeError",
    "HandshakeInterrupted",
    "Host",
    "Identity",
    "LocalProtocolError",
    "Mapping",
    "NameTaken",
    "NatReport",
    "Outcome",
    "PeerStream",
    "PeerVerificationError",
    "ProbeReport",
    "ProtocolError",
    "PunchError",
    "PunchFailed",
    "PunchOptions",
    "Relay",
    "RelayLimits",
    "RelayMode",
    "RelayRefused",
    "RemoteProtocolError",
    "RendezvousError",
    "ReuseUnavailable",
    "Role",
    "SelfDialError",
    "ServerLimits",
    "StreamPath",
    "WonBy",
    "connect",
    "natcheck",
    "open_host",
    "peer_id",
    "reuse_available",
    "serve_relay",
    "serve_rendezvous",
]
