"""What each ``punch`` command does once it holds a punched stream; see ``_cli.py``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio
from tqdm import tqdm

from . import transfer
from ._errors import RendezvousError
from ._host import Host
from ._stream import PeerStream

COPY_SIZE = 65536
CHAT_POLL = 0.5
"""Seconds between asks for a chat peer that has not registered yet."""
MAX_CHAT_LINE = 65536
"""Bytes: the longest line ``punch chat`` takes from a peer, newline excluded."""


class LineTooLong(ValueError):
    """The peer sent a chat line longer than :data:`MAX_CHAT_LINE` bytes; the chat ends."""


class Lines:
    """Splits a byte stream into lines, each at most ``limit`` bytes; linear in the input.

    Args:
        limit: bytes (>= 1) a line may hold, newline excluded.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, without their newlines.

        Raises:
            LineTooLong: more than ``limit`` bytes arrived without a newline.
        """
        start = len(self._buffer)  # only the new bytes are searched for a newline
        self._buffer += data
        lines = []
        begin = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            lines.append(bytes(self._buffer[begin:end]))
            begin = start = end + 1
        del self._buffer[:begin]
        if len(self._buffer) > self.limit or any(len(line) > self.limit for line in lines):
            raise LineTooLong(f"a line longer than {self.limit} bytes")
        return lines


class Reporter:
    """Status on stderr: one human line (``punch: ...``) or one JSON object per event.

    A JSON event carries ``elapsed``: seconds since the reporter was made (the
    command's start), so a tool can count what the control plane cost too.
    """

    def __init__(self, as_json: bool, file: TextIO | None = None) -> None:
        self.as_json = as_json
        self.file = file
        self.start = time.monotonic()

    def __call__(self, event: str, text: str, **fields: Any) -> None:
        elapsed = round(time.monotonic() - self.start, 4)
        line = (
            json.dumps({"event": event, "elapsed": elapsed, **fields})
            if self.as_json
            else f"punch: {text}"
        )
        print(line, file=self.file or sys.stderr, flush=True)


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


class Progress:
    """A transfer's progress: a tqdm bar on a terminal, else a line (or JSON) per 10%.

    Args:
        report: where plain and JSON lines go.
        verb: ``"sent"`` or ``"received"``.
        file: the terminal to draw on (default stderr); the bar is drawn only
            when it is a TTY and ``report`` is not JSON.
    """

    def __init__(self, report: Reporter, verb: str, file: TextIO | None = None) -> None:
        self.report, self.verb = report, verb
        self.file = file or sys.stderr
        self.bar: tqdm[Any] | None = None
        self.start: float | None = None
        self.next_tenth = 1

    def __call__(self, header: transfer.FileHeader, done: int) -> None:
        total = header.size
        if self.start is None:
            self.start = time.monotonic()
        if not self.report.as_json and self.file.isatty():
            if self.bar is None:
                self.bar = tqdm(
                    total=total,
                    desc=f"{self.verb} {header.name}",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self.file,
                )
            self.bar.update(done - self.bar.n)
            return
        if total and done * 10 < self.next_tenth * total:
            return
        self.next_tenth = done * 10 // total + 1 if total else 11
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0.0
        percent = 100 * done // total if total else 100
        self.report(
            "progress",
            f"{self.verb} {_mib(done)} of {_mib(total)} ({percent}%), "
            f"{_mib(rate)}/s, ETA {eta:.0f} s",
            file=header.name,
            done=done,
            total=total,
            bytes_per_second=round(rate),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stdio() -> tuple[trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """stdin and stdout as trio streams, on duplicated descriptors."""
    return (
        trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())),
        trio.lowlevel.FdStream(os.dup(sys.stdout.fileno())),
    )


async def pipe(stream: PeerStream) -> None:
    """netcat: stdin -> peer (then EOF) and peer -> stdout, both to completion."""
    stdin, stdout = _stdio()

    async def upload() -> None:
        while data := await stdin.receive_some(COPY_SIZE):
            await stream.send_all(data)
        await stream.send_eof()

    async with stdin, stdout, stream, trio.open_nursery() as nursery:
        nursery.start_soon(upload)
        while data := await stream.receive_some(COPY_SIZE):
            await stdout.send_all(data)


async def chat(stream: PeerStream, report: Reporter) -> None:
    """Lines from stdin go to the peer; the peer's lines are printed as ``name> line``.

    Ends when either side quits: our stdin reaching EOF, or the peer's EOF.

    Raises:
        LineTooLong: the peer sent a line over :data:`MAX_CHAT_LINE` bytes.
    """
    stdin, stdout = _stdio()
    async with stdin, stdout, stream, trio.open_nursery() as nursery:

        async def type_lines() -> None:
            while data := await stdin.receive_some(COPY_SIZE):
                await stream.send_all(data)
            await stream.send_eof()
            nursery.cancel_scope.cancel()

        nursery.start_soon(type_lines)
        lines = Lines(MAX_CHAT_LINE)
        while data := await stream.receive_some(COPY_SIZE):
            try:
                complete = lines.feed(data)
            except LineTooLong as exc:
                raise LineTooLong(f"{stream.peer_name!r} sent {exc}; chat closed") from None
            for line in complete:
                text = line.decode(errors="replace")
                await stdout.send_all(f"{stream.peer_name}> {text}\n".encode())
        report("left", f"{stream.peer_name!r} left the chat", peer=stream.peer_name)
        nursery.cancel_scope.cancel()


async def chat_stream(host: Host, peer: str, wait: float, report: Reporter) -> PeerStream:
    """The chat's one stream, whichever side starts first.

    Both sides run ``punch chat OTHER``; the name that sorts first is the
    initiator and asks for ``peer`` (again every :data:`CHAT_POLL` s while the
    rendezvous answers ``unknown-peer``), the other accepts only ``peer``.

    Raises:
        RendezvousError: ``unknown-peer``: ``peer`` did not turn up within
            ``wait`` seconds; or any error of :meth:`Host.connect`.
        PunchFailed, SelfDialError: as :meth:`Host.connect` / :meth:`Host.accept`.
    """
    with trio.move_on_after(wait):
        if host.name < peer:
            told = False
            while True:
                try:
                    return await host.connect(peer)
                except RendezvousError as exc:
                    if exc.code != "unknown-peer":
                        raise
                if not told:
                    report("waiting", f"waiting for {peer!r} to register", peer=peer)
                    told = True
                await trio.sleep(CHAT_POLL)
        report("waiting", f"waiting for {peer!r} to punch through", peer=peer)
        while True:
            stream = await host.accept()
            if stream.peer_name == peer:
                return stream
            report("ignored", f"ignored {stream.peer_name!r}: not {peer!r}", peer=stream.peer_name)
            await stream.aclose()
    raise RendezvousError("unknown-peer", f"{peer!r} did not turn up within {wait:g} s")


async def send(stream: PeerStream, path: Path, report: Reporter) -> None:
    """``punch send``: send ``path``, with progress; the receiver verifies it."""
    progress = Progress(report, "sent")
    async with stream:
        try:
            header = await transfer.send_file(stream, path, progress=progress)
        finally:
            progress.close()
    report(
        "verified",
        f"{header.name}: {header.size} bytes, SHA-256 {header.sha256} verified by the receiver",
        file=header.name,
        size=header.size,
        sha256=header.sha256,
    )


async def receive(
    stream: PeerStream, directory: Path, force: bool, max_size: int, report: Reporter
) -> None:
    """``punch receive``: one file (at most ``max_size`` bytes) into ``directory``, verified
    before it gets its name."""
    progress = Progress(report, "received")
    async with stream:
        try:
            path = await transfer.receive_file(
                stream, directory, overwrite=force, max_size=max_size, progress=progress
            )
        finally:
            progress.close()
    size = path.stat().st_size
    report("verified", f"saved {path} ({size} bytes, SHA-256 verified)", path=str(path), size=size)
