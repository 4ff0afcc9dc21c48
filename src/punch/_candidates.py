"""Which of the peer's candidates a race dials: pure selection, no sockets, no time."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ._endpoint import Candidate, Endpoint
from ._errors import SelfDialError
from ._reuse import check_not_self

MAX_DIALED_CANDIDATES = 8
"""Remote candidates dialled per introduction, in the order given (RFC 8445 §19: bounded checks)."""


@attrs.frozen
class Skipped:
    """A candidate not dialled, and why (one line)."""

    candidate: Candidate
    reason: str


@attrs.frozen
class Selection:
    """The candidates to dial, in the introduction's order, and those skipped."""

    dial: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...]


def select_candidates(
    candidates: Iterable[Candidate], local: Endpoint, own: Iterable[Endpoint], peer_name: str
) -> Selection:
    """Keep each transport address once, of our port's family, never our own, at most 8.

    Args:
        candidates: the peer's, in the introduction's order (server-reflexive first).
        local: the endpoint our listener holds.
        own: our other endpoints (chosen local, server-reflexive).
        peer_name: for the error message.

    Returns:
        the :class:`Selection`; duplicates go (RFC 8445 §5.1.3: one check per
        transport address), as do other families, our own endpoints
        (:func:`punch._reuse.check_not_self`) and everything past the first
        :data:`MAX_DIALED_CANDIDATES`.

    Raises:
        SelfDialError: some candidates were offered and every one is our own endpoint.
    """
    dial: list[Candidate] = []
    skipped: list[Skipped] = []
    self_dials: list[SelfDialError] = []
    seen: set[Endpoint] = set()
    own = tuple(own)
    for candidate in candidates:
        if candidate.endpoint in seen:
            skipped.append(Skipped(candidate, "same endpoint as an earlier candidate"))
            continue
        seen.add(candidate.endpoint)
        if candidate.endpoint.family != local.family:
            skipped.append(Skipped(candidate, f"not {local.family.name} like our port"))
            continue
        try:
            check_not_self(candidate.endpoint, local, own)
        except SelfDialError as exc:
            skipped.append(Skipped(candidate, str(exc)))
            self_dials.append(exc)
            continue
        dial.append(candidate)
    if not dial and self_dials:
        raise SelfDialError(
            f"every candidate of {peer_name!r} is our own endpoint: "
            + "; ".join(str(e) for e in self_dials)
        )
    over = f"only the first {MAX_DIALED_CANDIDATES} candidates are dialled"
    skipped += [Skipped(c, over) for c in dial[MAX_DIALED_CANDIDATES:]]
    return Selection(tuple(dial[:MAX_DIALED_CANDIDATES]), tuple(skipped))
