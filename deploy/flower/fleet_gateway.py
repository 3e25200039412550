"""Expose only a Flower 1.41 SuperLink's Fleet API on a public address.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr ls`,
`flwr supernode register`: no user authentication in the open-source version) and Runtime API
(the ServerApp's) on ONE HTTP port (`--host`/`--port`). Binding that port to 0.0.0.0 hands the
Control API, i.e. code execution on the SuperLink host, to anyone who reaches it. So the SuperLink
listens on 127.0.0.1 only and this gateway, on the public address, terminates TLS with the
SuperLink's certificate and forwards a request to the SuperLink (over TLS, verified against the
CA) only when it is `POST /v1/fleet/<route>`; everything else gets 403 and is never forwarded.
SuperNode authentication is unchanged: the SuperLink checks each request's signed headers.

    python deploy/flower/fleet_gateway.py --listen 0.0.0.0:9092 --upstream 127.0.0.1:9093 \\
        --certfile creds/server.pem --keyfile creds/server.key --cafile creds/ca.crt

One request per connection (the gateway asks the SuperLink to close after each reply, so clients
reconnect); request bodies must carry Content-Length (httpx, Flower's client, always does).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl
import sys

FLEET_PATH = re.compile(
    rb"/v1/fleet/[a-z][a-z-]*"
)  # the whole target: no query, no dot segments, no %
MAX_HEAD = 64 * 1024
READ_TIMEOUT_S = 60.0  # a client silent this long while sending its request is dropped


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def _refuse(writer: asyncio.StreamWriter, code: int, reason: str) -> None:
    body = f"{reason}\n".encode()
    writer.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (code, reason.encode(), len(body), body)
    )
    await writer.drain()


def _parse_head(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """(method, target, headers) of a request head, or None when it is malformed."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name.lower(), value.strip()))
    return parts[0], parts[1], headers


class FleetGateway:
    """Accepts TLS connections and relays Fleet API requests, and only those, to the SuperLink."""

    def __init__(
        self,
        upstream: tuple[str, int],
        server_ctx: ssl.SSLContext,
        upstream_ctx: ssl.SSLContext,
        upstream_name: str | None = None,
    ) -> None:
        self.upstream, self.server_ctx, self.upstream_ctx = upstream, server_ctx, upstream_ctx
        self.upstream_name = upstream_name or upstream[0]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ssl.SSLError,
            TimeoutError,
        ):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        parsed = _parse_head(head)
        if parsed is None:
            return await _refuse(writer, 400, "Bad Request")
        method, target, headers = parsed
        if method != b"POST" or not FLEET_PATH.fullmatch(target):
            return await _refuse(
                writer, 403, "Forbidden"
            )  # Control, Runtime, docs: never forwarded
        names = [n for n, _ in headers]
        lengths = [v for n, v in headers if n == b"content-length"]
        if b"transfer-encoding" in names or len(lengths) != 1 or not lengths[0].isdigit():
            return await _refuse(writer, 411, "Length Required")
        length = int(lengths[0])
        kept = [
            (n, v)
            for n, v in headers
            if n not in (b"connection", b"keep-alive", b"proxy-connection")
        ]
        out_head = b"".join(
            [
                b"POST %s HTTP/1.1\r\n" % target,
                *(b"%s: %s\r\n" % (n, v) for n, v in kept),
                b"connection: close\r\n\r\n",
            ]
        )

        up_reader, up_writer = await asyncio.open_connection(
            *self.upstream,
            ssl=self.upstream_ctx,
            server_hostname=self.upstream_name,
            limit=MAX_HEAD,
        )
        try:
            up_writer.write(out_head)
            remaining = length
            while remaining:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 20)), READ_TIMEOUT_S)
                if not chunk:
                    return
                remaining -= len(chunk)
                up_writer.write(chunk)
                await up_writer.drain()
            while chunk := await up_reader.read(1 << 20):  # the reply, until the SuperLink closes
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()

    async def serve(self, listen: tuple[str, int]) -> asyncio.Server:
        return await asyncio.start_server(self.handle, *listen, ssl=self.server_ctx, limit=MAX_HEAD)


def contexts(certfile: str, keyfile: str, cafile: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The TLS context facing SuperNodes (the SuperLink's certificate) and the one that verifies
    the SuperLink against the federation's CA."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certfile, keyfile)
    upstream_ctx = ssl.create_default_context(cafile=cafile)
    return server_ctx, upstream_ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--listen", type=_split, required=True, help="public HOST:PORT SuperNodes connect to"
    )
    parser.add_argument(
        "--upstream",
        type=_split,
        default=("127.0.0.1", 9093),
        help="the SuperLink's loopback HOST:PORT (default 127.0.0.1:9093)",
    )
    parser.add_argument(
        "--upstream-name",
        help="name to verify the SuperLink's certificate for (default: upstream host)",
    )
    parser.add_argument("--certfile", required=True, help="the SuperLink's TLS certificate (PEM)")
    parser.add_argument("--keyfile", required=True, help="its private key")
    parser.add_argument(
        "--cafile", required=True, help="the CA that signed the SuperLink's certificate"
    )
    args = parser.parse_args(argv)
    server_ctx, upstream_ctx = contexts(args.certfile, args.keyfile, args.cafile)
    gateway = FleetGateway(args.upstream, server_ctx, upstream_ctx, args.upstream_name)

    async def run() -> None:
        server = await gateway.serve(args.listen)
        print(
            f"Fleet gateway listening on {args.listen[0]}:{args.listen[1]} -> "
            f"{args.upstream[0]}:{args.upstream[1]} (POST /v1/fleet/* only)",
            flush=True,
        )
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
