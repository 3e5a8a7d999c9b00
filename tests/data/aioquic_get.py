#!/usr/bin/env python3
"""One HTTP/3 request with aioquic (PyPI), the independent client of tests/versions.rs and
tests/early_data.rs.

usage: aioquic_get.py URL [--quic-version 1|2] [--ticket FILE] [--early] [--method M]
                          [--data-size N]

--ticket FILE resumes the session saved there (if any) and saves the new ticket; --early sends
the request before the handshake completes (0-RTT when the ticket allows it). Prints, one per
line: 'status=S bytes=N sha256=HEX', 'version=0x...', 'resumed=yes|no', 'early=yes|no' (early
data accepted) and, for /headers, the echoed request head. Exit 0 when a response arrived.
"""

import argparse
import asyncio
import hashlib
import os
import pickle
import sys
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicProtocolVersion


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.responses = {}
        self.done = {}

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)):
                r = self.responses.setdefault(ev.stream_id, {"headers": [], "body": bytearray()})
                if isinstance(ev, HeadersReceived):
                    r["headers"] += ev.headers
                else:
                    r["body"] += ev.data
                if ev.stream_ended and ev.stream_id in self.done:
                    self.done.pop(ev.stream_id).set_result(r)

    async def request(self, method, authority, path, body):
        sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        self.h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        fut = asyncio.get_running_loop().create_future()
        self.done[sid] = fut
        self.transmit()
        return await asyncio.wait_for(fut, 20)


def pattern(n):
    return bytes(((i * 7 + (i >> 8)) & 0xFF) for i in range(n))


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--quic-version", type=int, default=1)
    p.add_argument("--ticket")
    p.add_argument("--early", action="store_true")
    p.add_argument("--method", default="GET")
    p.add_argument("--data-size", type=int, default=0)
    a = p.parse_args()
    u = urlparse(a.url)
    version = QuicProtocolVersion.VERSION_2 if a.quic_version == 2 else QuicProtocolVersion.VERSION_1
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=0)
    cfg.server_name = u.hostname
    cfg.original_version = version
    cfg.supported_versions = [version]
    if a.ticket and os.path.exists(a.ticket) and os.path.getsize(a.ticket) > 0:
        with open(a.ticket, "rb") as f:
            cfg.session_ticket = pickle.load(f)

    def save(ticket):
        if a.ticket:
            with open(a.ticket, "wb") as f:
                pickle.dump(ticket, f)

    async with connect(
        "127.0.0.1" if u.hostname == "localhost" else u.hostname,
        u.port or 443,
        configuration=cfg,
        create_protocol=Client,
        session_ticket_handler=save,
        wait_connected=not a.early,
    ) as client:
        # No wait_connected() after an early request: aioquic 1.x only marks the protocol
        # connected when a waiter existed at handshake time. A response implies the handshake
        # completed on our side (the server's Finished comes before its 1-RTT packets).
        r = await client.request(a.method, u.netloc, u.path or "/", pattern(a.data_size))
        status = dict(r["headers"]).get(b":status", b"?").decode()
        body = bytes(r["body"])
        print(f"status={status} bytes={len(body)} sha256={hashlib.sha256(body).hexdigest()}")
        print(f"version={client._quic._version:#x}")
        print(f"resumed={'yes' if client._quic.tls.session_resumed else 'no'}")
        print(f"early={'yes' if client._quic.tls.early_data_accepted else 'no'}")
        if u.path == "/headers":
            sys.stdout.write(body.decode(errors="replace"))
        # Give the server's session tickets time to arrive before closing.
        await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main())
