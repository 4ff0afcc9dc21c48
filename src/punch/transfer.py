"""Send one file over a punched stream, checked by size and SHA-256: ``punch send``/``receive``.

The wire, after the punch (every control line is one JSON object and ``\\n``,
at most :data:`MAX_LINE` bytes):

1. sender: ``{"name": "report.pdf", "size": 1048576, "sha256": "<64 hex>"}``
2. receiver: ``{"status": "ready"}``, or ``{"status": "refused", "reason": ...}``
   and it closes (name taken, bad name, too large)
3. sender: exactly ``size`` bytes, then EOF (``send_eof``)
4. receiver: ``{"status": "verified"}`` or ``{"status": "corrupt", "reason": ...}``

The receiver writes into a temporary file in the target directory and moves
it into place only once size and digest match, so a failed transfer never
leaves a partial file under the real name, and never replaces one.

Example::

    header = await punch.transfer.send_file(stream, Path("report.pdf"))
    path = await punch.transfer.receive_file(stream, Path("inbox"))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from ._errors import PunchError

__all__ = ["MAX_LINE", "FileHeader", "Progress", "TransferError", "receive_file", "send_file"]

CHUNK = 256 * 1024
"""Bytes per read and per write."""

MAX_LINE = 4096
"""The longest control line either side accepts, in bytes."""

Progress = Callable[["FileHeader", int], None]
"""Called as ``progress(header, done)`` after each chunk; ``done`` is bytes so far."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


class TransferError(PunchError):
    """A file transfer failed; the stream should be closed.

    Attributes:
        reason: a short code: ``"refused"`` (the receiver said no),
            ``"corrupt"`` (size or SHA-256 differ), ``"truncated"`` (the peer
            closed early), ``"protocol"`` (a malformed control line).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@attrs.frozen
class FileHeader:
    """What the sender announces before the bytes.

    Attributes:
        name: the file's base name (no directory part, not ``.``/``..``).
        size: bytes, >= 0.
        sha256: the SHA-256 of the content, 64 lowercase hex digits.
    """

    name: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, data: Any) -> FileHeader:
        """Check and build a header from a decoded JSON object.

        Raises:
            TransferError: ``protocol``: a missing or ill-typed field, a name
                with a directory part, a negative size or a digest that is not
                64 lowercase hex digits.
        """
        if not isinstance(data, dict) or set(data) != {"name", "size", "sha256"}:
            raise TransferError("protocol", f"not a file header: {data!r}")
        name, size, digest = data["name"], data["size"], data["sha256"]
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or Path(name).name != name
            or "\\" in name
            or "\0" in name
        ):
            raise TransferError("protocol", f"not a plain file name: {name!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TransferError("protocol", f"size must be bytes >= 0, not {size!r}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise TransferError("protocol", f"sha256 must be 64 hex digits, not {digest!r}")
        return cls(name, size, digest)


class _Lines:
    """JSON control lines over a stream; bytes read past a line are kept for the body."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, **fields: Any) -> None:
        await self.stream.send_all(json.dumps(fields).encode() + b"\n")

    async def receive(self) -> Any:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_LINE:
                raise TransferError("protocol", f"control line longer than {MAX_LINE} bytes")
            data = await self.stream.receive_some(CHUNK)
            if not data:
                raise TransferError("truncated", "the peer closed the connection")
            self.buffer += data
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        try:
            return json.loads(line)
        except ValueError:
            raise TransferError("protocol", f"not a JSON line: {line[:80]!r}") from None

    async def status(self, expected: str) -> None:
        """Read a ``{"status": ...}`` line; raise unless it is ``expected``."""
        answer = await self.receive()
        status = answer.get("status") if isinstance(answer, dict) else None
        if status == expected:
            return
        if status in ("refused", "corrupt"):
            raise TransferError(status, str(answer.get("reason", "no reason given")))
        raise TransferError("protocol", f"expected {expected!r}, got {answer!r}")


async def file_header(path: Path) -> FileHeader:
    """Name, size and SHA-256 of the file at ``path`` (read once, in a thread).

    Raises:
        OSError: the file cannot be read.
    """

    def digest() -> tuple[int, str]:
        sha, size = hashlib.sha256(), 0
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
        return size, sha.hexdigest()

    size, sha = await trio.to_thread.run_sync(digest)
    return FileHeader(path.name, size, sha)


async def send_file(
    stream: trio.abc.HalfCloseableStream, path: Path, *, progress: Progress | None = None
) -> FileHeader:
    """Send the file at ``path``, then half-close, and wait for the receiver's verdict.

    Args:
        stream: a connected stream (a :class:`~punch.PeerStream`); left open,
            with our sending side closed (``send_eof``).
        path: a readable regular file.
        progress: called as ``progress(header, bytes sent)`` after each chunk.

    Returns:
        the :class:`FileHeader` that was sent and verified.

    Raises:
        OSError: ``path`` cannot be read.
        TransferError: ``refused``, ``corrupt``, ``truncated`` or ``protocol``.
        trio.BrokenResourceError: the connection broke.
    """
    header = await file_header(path)
    lines = _Lines(stream)
    await lines.send(**attrs.asdict(header))
    await lines.status("ready")
    sent = 0
    async with await trio.open_file(path, "rb") as file:
        while sent < header.size and (chunk := await file.read(min(CHUNK, header.size - sent))):
            await stream.send_all(chunk)
            sent += len(chunk)
            if progress is not None:
                progress(header, sent)
    if sent != header.size:
        raise TransferError("truncated", f"{path} shrank to {sent} bytes while being sent")
    await stream.send_eof()
    await lines.status("verified")
    return header


async def receive_file(
    stream: trio.abc.Stream,
    directory: Path,
    *,
    overwrite: bool = False,
    max_size: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Receive one file into ``directory``, check its size and SHA-256, move it into place.

    Args:
        stream: a connected stream (a :class:`~punch.PeerStream`); left open.
        directory: an existing, writable directory.
        overwrite: replace a file of the same name (default: refuse it).
        max_size: refuse files larger than this many bytes (default: no limit).
        progress: called as ``progress(header, bytes received)`` after each chunk.

    Returns:
        the path of the verified file, ``directory / header.name``.

    Raises:
        TransferError: ``refused`` (we refused: the name is taken and
            ``overwrite`` is off, the file is over ``max_size``, or larger
            than the free space in ``directory`` (statvfs(3)); the sender is
            told why), ``corrupt`` (size or digest differ; nothing is kept),
            ``truncated`` (the sender closed early) or ``protocol``.
        OSError: the file cannot be written.
        trio.BrokenResourceError: the connection broke.
    """
    lines = _Lines(stream)
    header = FileHeader.from_json(await lines.receive())
    target = directory / header.name
    refusal = None
    if not overwrite and target.exists():
        refusal = f"{header.name} already exists at the receiver (it may use --force)"
    elif max_size is not None and header.size > max_size:
        refusal = f"{header.size} bytes is over the receiver's limit of {max_size}"
    elif header.size > (free := shutil.disk_usage(directory).free):
        refusal = f"{header.size} bytes will not fit: {free} bytes free at the receiver"
    if refusal is not None:
        await lines.send(status="refused", reason=refusal)
        raise TransferError("refused", refusal)
    partial = directory / f".{header.name}.{os.getpid()}.partial"
    try:
        digest, received = await _receive_body(lines, header, partial, progress)
        if received != header.size or digest != header.sha256:
            reason = (
                f"got {received} of {header.size} bytes"
                if received != header.size
                else f"SHA-256 {digest} is not the announced {header.sha256}"
            )
            await lines.send(status="corrupt", reason=reason)
            raise TransferError("corrupt", reason)
        if overwrite:
            partial.replace(target)
        else:
            try:
                os.link(partial, target)  # atomic: fails if the name appeared meanwhile
            except FileExistsError:
                refusal = f"{header.name} appeared at the receiver during the transfer"
                await lines.send(status="refused", reason=refusal)
                raise TransferError("refused", refusal) from None
    finally:
        partial.unlink(missing_ok=True)
    await lines.send(status="verified")
    return target


async def _receive_body(
    lines: _Lines, header: FileHeader, partial: Path, progress: Progress | None
) -> tuple[str, int]:
    """Write the body to ``partial``; its SHA-256 and length (reading to EOF)."""
    await lines.send(status="ready")
    sha, received = hashlib.sha256(), 0
    async with await trio.open_file(partial, "xb") as file:
        chunk: bytes | bytearray = bytes(lines.buffer)
        lines.buffer.clear()
        while True:
            if chunk:
                await file.write(chunk)
                sha.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(header, min(received, header.size))
            if received > header.size or not (chunk := await lines.stream.receive_some(CHUNK)):
                break
    return sha.hexdigest(), received
