"""TLS 1.3 over a punched TCP stream, with half-close: stdlib ``ssl``'s SSLObject on memory BIOs.

Why not ``trio.SSLStream``: it is not half-closeable (no ``send_eof``), and a
:class:`~punch.PeerStream` is (``punch send``, ``punch pipe`` and chat end
their direction with EOF and keep reading). TLS 1.3 closes one direction at a
time: ``close_notify`` ends the sender's writing only, and the peer may keep
writing (RFC 8446 §6.1). The ``ssl`` module sends it with ``unwrap()``, which
also tries once to read the peer's ``close_notify``; OpenSSL drops application
records it reads there, so :meth:`TLSStream.send_eof` first decrypts every
whole record already buffered, and the read finds none. All cryptography is
OpenSSL's; this module only moves bytes.
"""

from __future__ import annotations

import ssl

import trio

_RECEIVE_SIZE = 65536
CLOSE_NOTIFY_TIMEOUT = 1.0
"""Seconds :meth:`TLSStream.aclose` may wait for its ``close_notify`` to leave."""


def _broken(exc: BaseException) -> trio.BrokenResourceError:
    error = trio.BrokenResourceError(f"TLS failed: {exc}")
    error.__cause__ = exc
    return error


class TLSStream(trio.abc.HalfCloseableStream):
    """A TLS connection over ``transport``; one task may send while another receives.

    Args:
        transport: the connected TCP stream (or a
            :class:`~punch._handover.Handover` over one).
        context: from :meth:`punch._identity.Identity.tls_context`.
        server_side: we are the TLS server.
        pending: bytes already read from ``transport`` that belong to TLS
            (read past the punch handshake).

    Raises (every method): :class:`trio.BrokenResourceError` when TLS or the
    transport fails (``__cause__`` tells which: an :class:`ssl.SSLError`, such
    as :class:`ssl.SSLCertVerificationError`, or the transport's error).
    """

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        pending: bytes = b"",
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._incoming.write(pending)
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._plain = bytearray()  # decrypted by send_eof before its close_notify
        self._eof = False  # the peer's close_notify came
        self._send_lock = trio.StrictFIFOLock()
        self._receive_lock = trio.StrictFIFOLock()

    async def _flush(self) -> None:
        """Send whatever OpenSSL wrote to the outgoing BIO. Caller holds the send lock."""
        data = self._outgoing.read()
        if data:
            await self.transport.send_all(data)

    async def _fill(self) -> None:
        """Read more ciphertext into the incoming BIO. Caller holds the receive lock."""
        data = await self.transport.receive_some(_RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def feed(self, data: bytes) -> None:
        """Hand TLS bytes of the peer's that were read from the transport before
        this stream took it over (as ``pending`` does at construction)."""
        self._incoming.write(data)

    def flight(self) -> bytes:
        """Our next handshake flight, as far as the bytes fed so far take it, to send
        now with other bytes (the client's ClientHello; the server's reply to a
        ClientHello passed as ``pending``); :meth:`do_handshake` then goes on from it.

        Raises:
            trio.BrokenResourceError: OpenSSL refused to start (a bad context) or
                refused what was fed (not a ClientHello it accepts).
        """
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return self._outgoing.read()
        except ssl.SSLError as exc:
            raise _broken(exc) from exc
        raise AssertionError("a TLS 1.3 handshake cannot finish in one flight")

    async def do_handshake(self) -> None:
        """Run the TLS handshake to its end (our side of it).

        Raises:
            trio.BrokenResourceError: the handshake failed (the peer's
                certificate did not verify, the peer refused ours, the
                connection closed).
        """
        async with self._send_lock, self._receive_lock:
            while True:
                try:
                    self.ssl_object.do_handshake()
                except ssl.SSLWantReadError:
                    await self._flush()
                    await self._fill()
                    continue
                except ssl.SSLError as exc:
                    await self._flush_quietly()
                    raise _broken(exc) from exc
                await self._flush()
                return

    async def _flush_quietly(self) -> None:
        """Best effort: send a pending alert so the peer learns why."""
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            if not data:
                await trio.lowlevel.checkpoint()
                return
            try:
                self.ssl_object.write(data)
            except ssl.SSLError as exc:
                raise _broken(exc) from exc
            await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` decrypted bytes; ``b""`` once the peer sent ``close_notify``.

        Raises:
            ValueError: ``max_bytes`` below 1.
            trio.BrokenResourceError: TLS failed, or the transport closed
                without ``close_notify`` (a truncation).
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        size = max_bytes or _RECEIVE_SIZE
        async with self._receive_lock:
            while True:
                if self._plain:
                    out = bytes(self._plain[:size])
                    del self._plain[:size]
                    await trio.lowlevel.checkpoint()
                    return out
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                try:
                    data = self.ssl_object.read(size)
                    if data:
                        return data
                    self._eof = True  # read() gives b"" at close_notify (or raises, below)
                except ssl.SSLWantReadError:
                    await self._fill()
                except ssl.SSLZeroReturnError:
                    self._eof = True
                except ssl.SSLError as exc:
                    raise _broken(exc) from exc

    async def send_eof(self) -> None:
        """Send ``close_notify`` and a FIN: we write no more; reading goes on.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError: as the transport.
        """
        async with self._send_lock:
            self._decrypt_buffered()
            try:
                self.ssl_object.unwrap()
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify is not here: fine, we do not wait for it
            except ssl.SSLError as exc:
                raise _broken(exc) from exc
            await self._flush()
            await self.transport.send_eof()

    def _decrypt_buffered(self) -> None:
        """Decrypt every whole record in the incoming BIO into :attr:`_plain`, so that
        ``unwrap``'s read of the peer's ``close_notify`` finds no application data."""
        while not self._eof:
            try:
                data = self.ssl_object.read(_RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._eof = True
                return
            except ssl.SSLError:
                return  # the next receive_some reports it
            if data:
                self._plain += data
            else:
                self._eof = True

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort, for at most :data:`CLOSE_NOTIFY_TIMEOUT`
        seconds, when the handshake finished and no send is under way) and close."""
        try:
            if self.ssl_object.version() is not None and not self._send_lock.locked():
                self._decrypt_buffered()
                try:
                    self.ssl_object.unwrap()
                except ssl.SSLError:
                    pass
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                    await self._flush_quietly()
        finally:
            await self.transport.aclose()
