"""The one SuperLink port that faces SuperNodes: Flower's Fleet API, and nothing else.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port (`--host`,
`--port`); `--fleet-api-address` and `--control-api-address` are deprecated there and open no
listener of their own. Whoever reaches that port and trusts the CA could use the Control API:
register a key of their own (`flwr supernode register`) and submit a run, an app bundle that
every SuperNode then executes. So the SuperLink listens on loopback (or a private interface),
and this gateway, on the address SuperNodes dial, passes on only Fleet calls
(`POST /v1/fleet/<call>`) and `GET /health`. Every other request is answered 404 here and never
reaches the SuperLink.

TLS ends here with the SuperLink's certificate and starts again towards the SuperLink, checked
against the CA. A SuperNode's authentication (a signed timestamp in its request headers) passes
through unchanged, so the SuperLink still decides which nodes are let in.

    python -m fl_app.deploy.fleet_gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 \\
        --ssl-certfile creds/server.pem --ssl-keyfile creds/server.key \\
        --ssl-ca-certfile creds/ca.crt
"""

from __future__ import annotations

import argparse
import re
import ssl
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FLEET_CALL = re.compile(r"/v1/fleet/[a-z][a-z-]*")
# Connection-level headers belong to one hop; the rest (content type, Flower's version and
# node-authentication headers) travel end to end. The body is passed on decoded (the gateway
# asks the SuperLink for no compression), so its encoding and length are the gateway's own.
HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "content-length", "content-encoding",
                         "accept-encoding"})
UPSTREAM_TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # a model's arrays may take a while
# A stranger may reach this port: a request body is read only up to this size, so nobody can
# make the gateway hold gigabytes in memory. 512 MiB is far above any reply of fl_app's models
# (the CNN's arrays are 6.6 MB); --max-body-mb raises it for larger ones.
MAX_BODY_MB = 512


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None when it is (or says it is) larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _end_to_end(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]


def create_app(superlink: str, ca_certfile: Path | None,
               transport: httpx.AsyncBaseTransport | None = None,
               max_body_mb: float = MAX_BODY_MB) -> Starlette:
    """The gateway as an ASGI app forwarding Fleet calls to `superlink` (host:port).

    `ca_certfile`: reach the SuperLink over TLS checked against this CA; None: plain HTTP (a
    SuperLink started with `--insecure`). `transport`: how to reach it (tests pass a fake).
    """
    scheme = "https" if ca_certfile else "http"
    max_body = int(max_body_mb * 2**20)
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(ca_certfile))
                                     if ca_certfile else False)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        async with httpx.AsyncClient(base_url=f"{scheme}://{superlink}", verify=verify,
                                     timeout=UPSTREAM_TIMEOUT, transport=transport) as client:
            app.state.upstream = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        allowed = ((request.method == "POST" and FLEET_CALL.fullmatch(path))
                   or (request.method == "GET" and path == "/health"))
        if not allowed:
            return JSONResponse(status_code=404, content={
                "detail": f"{request.method} {path} is not served here: this address serves "
                          "SuperNodes the Fleet API only. The Control API (flwr run, ls, "
                          "supernode register) listens where the SuperLink's --host/--port "
                          "say, on a private address."})
        # The URL is rebuilt from the checked path, without the query string: nothing the
        # client wrote beyond it can reach the SuperLink.
        headers = [*_end_to_end(request.headers.items()), ("accept-encoding", "identity")]
        body = await _bounded_body(request, max_body)
        if body is None:
            return JSONResponse(status_code=413, content={
                "detail": f"request body over {max_body_mb:g} MiB: refused here (the gateway's "
                          "--max-body-mb sets the limit)"})
        try:
            reply = await request.app.state.upstream.request(
                request.method, path, headers=headers, content=body)
        except httpx.TransportError as err:
            # 502 is what a SuperNode retries on, as it retries a SuperLink it cannot reach.
            return JSONResponse(status_code=502, content={
                "detail": f"the SuperLink behind this gateway did not answer: {err!r}"})
        return Response(reply.content, status_code=reply.status_code,
                        headers=dict(_end_to_end(reply.headers.multi_items())))

    return Starlette(routes=[Route("/{path:path}", forward,
                                   methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                     lifespan=lifespan)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (e.g. 0.0.0.0:9092)")
    return host.strip("[]"), int(port)


def _file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return Path(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fl_app.deploy.fleet_gateway",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_address, required=True,
                        help="host:port SuperNodes dial (their --superlink)")
    parser.add_argument("--superlink", type=_address, required=True,
                        help="host:port of the SuperLink's --host/--port (private)")
    parser.add_argument("--ssl-certfile", type=_file, help="the SuperLink's server.pem")
    parser.add_argument("--ssl-keyfile", type=_file, help="the SuperLink's server.key")
    parser.add_argument("--ssl-ca-certfile", type=_file, help="ca.crt")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_MB,
                        help=f"largest request body passed on, MiB (default {MAX_BODY_MB})")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP on both sides (a SuperLink started with --insecure)")
    args = parser.parse_args(argv)
    tls = [args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile]
    if (any(tls) if args.insecure else not all(tls)):
        parser.error("give either all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile, "
                     "or --insecure")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    (host, port), (up_host, up_port) = args.listen, args.superlink
    upstream = f"[{up_host}]:{up_port}" if ":" in up_host else f"{up_host}:{up_port}"
    app = create_app(upstream, None if args.insecure else args.ssl_ca_certfile,
                     max_body_mb=args.max_body_mb)
    print(f"fl-app-fleet-gateway: Fleet API on {host}:{port} -> SuperLink {upstream}",
          file=sys.stderr, flush=True)
    # The SuperLink's own Server and Date headers pass through; the gateway adds none.
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False,
                date_header=False,
                ssl_certfile=None if args.insecure else str(args.ssl_certfile),
                ssl_keyfile=None if args.insecure else str(args.ssl_keyfile))


if __name__ == "__main__":
    main()
