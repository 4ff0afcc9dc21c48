"""Attempts as data: outcomes, and the pacing figure read from them."""

from __future__ import annotations

import errno

import pytest

from punch import (
    Attempt,
    Candidate,
    CandidateType,
    Endpoint,
    HandshakeError,
    HandshakeInterrupted,
    Outcome,
    SelfDialError,
)
from punch._outcome import classify, max_attempts_per_second, peak_rate

SRFLX = Candidate(CandidateType.SERVER_REFLEXIVE, Endpoint("203.0.113.12", 4000))
HOST = Candidate(CandidateType.HOST, Endpoint("10.0.2.2", 4000))


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "RST or port unreachable"), Outcome.REFUSED),
        (OSError(errno.EHOSTUNREACH, "admin prohibited"), Outcome.REFUSED),
        (OSError(errno.EADDRNOTAVAIL, "4-tuple held"), Outcome.ADDRESS_IN_USE),
        (TimeoutError("no answer"), Outcome.NO_ANSWER),
        (HandshakeInterrupted("reset"), Outcome.HANDSHAKE_INTERRUPTED),
        (HandshakeError("bad proof"), Outcome.HANDSHAKE_FAILED),
        (SelfDialError("ourselves"), Outcome.SELF_DIAL),
        (OSError(errno.EPERM, "firewall"), Outcome.ERROR),
    ],
)
def test_each_error_has_its_outcome(error: OSError, outcome: Outcome) -> None:
    assert classify(error) is outcome
    attempt = Attempt.failed(SRFLX, 1, 0.0, 0.1, error)
    assert attempt.as_json()["outcome"] == outcome.value
    assert type(error).__name__ in (attempt.error or "")


def test_the_busiest_second_per_candidate() -> None:
    starts = [0.0, 0.1, 0.2, 1.5, 1.6, 2.55]
    attempts = [Attempt(SRFLX, i + 1, t, t, Outcome.REFUSED) for i, t in enumerate(starts)]
    attempts += [
        Attempt(HOST, 1, 0.0, 0.0, Outcome.ERROR),
        Attempt(HOST, 2, 0.5, 0.5, Outcome.ERROR),
    ]
    assert max_attempts_per_second(attempts) == 3
    assert peak_rate([]) == 0
    # the JSON form the CLI prints is read the same way
    assert peak_rate((a.as_json()["candidate"], a.as_json()["started"]) for a in attempts) == 3
