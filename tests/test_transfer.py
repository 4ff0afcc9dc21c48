"""punch.transfer: one file, checked by size and SHA-256, never half-saved."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from punch import PeerStream
from punch.transfer import FileHeader, TransferError, receive_file, send_file


def _header_line(data: bytes, name: str = "f.bin", size: int | None = None) -> bytes:
    header = {
        "name": name,
        "size": len(data) if size is None else size,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return json.dumps(header).encode() + b"\n"


async def test_a_file_crosses_a_punched_stream_and_is_verified(
    punch_pair: tuple[PeerStream, PeerStream], tmp_path: Path
) -> None:
    initiator, responder = punch_pair
    source, inbox = tmp_path / "data.bin", tmp_path / "inbox"
    source.write_bytes(os.urandom(3 * 256 * 1024 + 17))
    inbox.mkdir()
    sent: list[int] = []
    received: list[Path] = []

    async def receive() -> None:
        received.append(await receive_file(responder, inbox))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        header = await send_file(initiator, source, progress=lambda h, done: sent.append(done))
    assert received == [inbox / "data.bin"]
    assert received[0].read_bytes() == source.read_bytes()
    assert header == FileHeader(
        "data.bin", source.stat().st_size, hashlib.sha256(source.read_bytes()).hexdigest()
    )
    assert sent == sorted(sent)
    assert sent[-1] == header.size
    assert [p.name for p in inbox.iterdir()] == ["data.bin"]  # no partial file left


@pytest.mark.parametrize("overwrite", [False, True])
async def test_an_existing_file_is_refused_unless_overwrite(
    punch_pair: tuple[PeerStream, PeerStream], tmp_path: Path, overwrite: bool
) -> None:
    initiator, responder = punch_pair
    source, inbox = tmp_path / "same.txt", tmp_path / "inbox"
    source.write_bytes(b"new content")
    inbox.mkdir()
    (inbox / "same.txt").write_bytes(b"old content")
    errors: list[TransferError] = []

    async def receive() -> None:
        try:
            await receive_file(responder, inbox, overwrite=overwrite)
        except TransferError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        if overwrite:
            await send_file(initiator, source)
        else:
            with pytest.raises(TransferError, match="already exists") as info:
                await send_file(initiator, source)
            assert info.value.reason == "refused"
    if overwrite:
        assert (inbox / "same.txt").read_bytes() == b"new content"
        assert errors == []
    else:
        assert (inbox / "same.txt").read_bytes() == b"old content"
        assert [e.reason for e in errors] == ["refused"]


async def _receive_from(wire: bytes, inbox: Path) -> tuple[TransferError, bytes]:
    """Play a sender that writes ``wire`` then EOF; the receiver's error and its answers."""
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(wire)
    await ours.send_eof()
    with pytest.raises(TransferError) as info:
        await receive_file(theirs, inbox)
    await theirs.aclose()
    answers = b""
    while data := await ours.receive_some():
        answers += data
    return info.value, answers


@pytest.mark.parametrize(
    ("wire", "reason", "detail"),
    [
        (_header_line(b"abc") + b"abd", "corrupt", "SHA-256"),
        (_header_line(b"abcdef") + b"abc", "corrupt", "got 3 of 6 bytes"),
        (_header_line(b"abc", size=2) + b"abc", "corrupt", "got 3 of 2 bytes"),
        (_header_line(b"abc")[:-1], "truncated", "closed"),
        (b"x" * 5000, "protocol", "longer than 4096"),
        (b"[1, 2]\n", "protocol", "not a file header"),
        (b"{not json\n", "protocol", "not a JSON line"),
    ],
)
async def test_a_bad_sender_leaves_no_file(
    tmp_path: Path, wire: bytes, reason: str, detail: str
) -> None:
    error, answers = await _receive_from(wire, tmp_path)
    assert error.reason == reason
    assert detail in error.detail
    assert list(tmp_path.iterdir()) == []
    if reason == "corrupt":
        assert (
            answers.splitlines()[-1]
            == json.dumps({"status": "corrupt", "reason": error.detail}).encode()
        )


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "a\0b"])
def test_a_header_name_with_a_directory_part_is_refused(name: str) -> None:
    with pytest.raises(TransferError, match="not a plain file name"):
        FileHeader.from_json({"name": name, "size": 1, "sha256": "0" * 64})


@pytest.mark.parametrize(
    ("size", "digest"),
    [(-1, "0" * 64), (True, "0" * 64), (1.5, "0" * 64), (1, "0" * 63), (1, "A" * 64)],
)
def test_a_header_size_or_digest_out_of_range_is_refused(size: object, digest: str) -> None:
    with pytest.raises(TransferError) as info:
        FileHeader.from_json({"name": "f", "size": size, "sha256": digest})
    assert info.value.reason == "protocol"


async def test_a_file_over_max_size_is_refused_before_its_bytes(tmp_path: Path) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(_header_line(b"", size=10**9))
    with pytest.raises(TransferError, match="over the receiver's limit"):
        await receive_file(theirs, tmp_path, max_size=10**6)
    answer = json.loads(await ours.receive_some())
    assert answer["status"] == "refused"


async def test_a_file_larger_than_the_free_space_is_refused_before_its_bytes(
    tmp_path: Path,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(_header_line(b"", size=2**62))  # 4 EiB: no disk here has that free
    with pytest.raises(TransferError, match="will not fit"):
        await receive_file(theirs, tmp_path)  # no max_size: the disk check alone
    answer = json.loads(await ours.receive_some())
    assert answer["status"] == "refused"
    assert "free at the receiver" in answer["reason"]
    assert list(tmp_path.iterdir()) == []
