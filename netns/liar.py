"""A lying rendezvous for the lab's man-in-the-middle tests: the real server, one method replaced.

``python -m netns.liar LIE punch-rendezvous-arguments...``, where ``LIE`` is

- ``swap-keys``: each side is introduced with its *own* registered certificate
  in place of its peer's (a rendezvous that hands out keys it chose);
- ``VICTIM=IMPOSTOR``: a request for ``VICTIM`` introduces the registered host
  ``IMPOSTOR`` under ``VICTIM``'s name, with ``IMPOSTOR``'s real key (a
  rendezvous that sends a third host in place of the peer).

Everything else (registration, challenges, limits, the CLI) is the real
``punch rendezvous``; only :meth:`punch._server.RendezvousServer.introductions`
is replaced.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import attrs

from punch import _cli
from punch._server import RendezvousServer

_honest = RendezvousServer.introductions
Pair = Any  # ((peer, Introduction), (peer, Introduction)), as RendezvousServer.introductions


def swap_keys(server: RendezvousServer, requester: Any, target: Any, request_id: int) -> Pair:
    (requester, to_requester), (target, to_target) = _honest(server, requester, target, request_id)
    return (
        (requester, attrs.evolve(to_requester, certificate=to_target.certificate)),
        (target, attrs.evolve(to_target, certificate=to_requester.certificate)),
    )


def impersonate(victim: str, impostor: str) -> Callable[..., Pair]:
    def lie(server: RendezvousServer, requester: Any, target: Any, request_id: int) -> Pair:
        if target.name != victim:
            return _honest(server, requester, target, request_id)
        (requester, to_requester), to_impostor = _honest(
            server, requester, server.peers[impostor], request_id
        )
        return (requester, attrs.evolve(to_requester, peer_name=victim)), to_impostor

    return lie


def main(argv: list[str]) -> int:
    lie, *rest = argv
    if lie == "swap-keys":
        RendezvousServer.introductions = swap_keys  # type: ignore[method-assign]
    else:
        victim, impostor = lie.split("=")
        RendezvousServer.introductions = impersonate(victim, impostor)  # type: ignore[method-assign]
    return _cli.main(["rendezvous", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
