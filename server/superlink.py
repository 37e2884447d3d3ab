"""A Flower SuperLink whose Control API only the coordinator's machine can reach.

    python -m server.superlink --fleet-host 0.0.0.0 --fleet-port 9092 \\
        --host 127.0.0.1 --port 9093 [every other flower-superlink option]

Why this exists: ``flower-superlink`` 1.42 serves the Fleet API (SuperNodes), the Control
API (``flwr run``, ``flwr ls``, ``flwr supernode register``) and the Runtime API (the
ServerApp's own connection) on one HTTP port, ``--host:--port``. ``--fleet-api-address`` and
``--control-api-address`` are deprecated and no longer separate them, and the Control API's
only authentication (OIDC accounts) needs Flower Enterprise. Whoever can reach that one
port can therefore register a node and start a run that executes code on this machine.

This launcher runs the very same SuperLink (Flower's own argument parsing, app, state,
SuperExec) with two listeners on one shared state:

* ``--host:--port`` (must be a loopback or otherwise private address): every API, for
  ``flwr`` on this machine and for the ServerApp process the SuperLink starts;
* ``--fleet-host:--fleet-port`` (the address sites reach): only the Fleet API's request
  paths and ``/health``. Any other path gets 404 before it reaches Flower.

Both listeners use the SuperLink's TLS certificate. Stop it with SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fedmoco.network import is_loopback_bind, is_private_bind, loopback_bypasses_proxy, with_interpreter_bin

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

log = logging.getLogger("fedmoco.superlink")


def fleet_paths() -> frozenset[str]:
    """Exact request paths of Flower's Fleet API (what a SuperNode calls) plus ``/health``."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset({route.path for route in router.routes} | {"/health"})


def max_fleet_body() -> int:
    """Largest request body the fleet address accepts, in bytes: a SuperNode sends model
    arrays in chunks of Flower's ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` (5 MiB by default) and
    every other fleet request is small, so 4 chunks, and at least 64 MiB, leave room."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    return max(64 * 2**20, 4 * int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE))


class FleetOnly:
    """ASGI wrapper passing only ``allowed`` exact paths to ``app``; everything else 404.

    Exact matching (no prefixes) means no ``..``, ``//`` or percent-encoding trick can turn
    an allowed path into a Control or Runtime one. Lifespan events are not forwarded: the
    loopback listener owns the SuperLink's start-up and shut-down.

    A body over ``max_body`` bytes is refused (413) before it is read: Flower's REST fleet
    API reads a whole request into memory before it checks the node's signature, so without
    a bound any stranger could make the coordinator's internet-facing port buffer gigabytes.
    A body without a length (chunked) is cut off once it passes the bound. Requests being
    served together may hold at most ``max_inflight`` bytes of bodies, counted as they arrive:
    a request that would pass it is answered 503 (or, mid-body, dropped), which Flower's
    SuperNodes retry with back-off, so honest uploads queue while N strangers' connections
    cannot make the coordinator hold N x ``max_body``. Bytes received, not lengths declared:
    counted by declared length, 8 idle connections each declaring 64 MiB and sending 2 bytes
    held the whole bound and every site got 503 for as long as they stayed (found by an audit).
    A body that stalls (no bytes for ``body_idle_s`` seconds) is dropped, so a stranger cannot
    hold what it did send for longer either.
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str], max_body: int | None = None,
                 max_inflight: int | None = None, body_idle_s: float = 30.0) -> None:
        self.app, self.allowed = app, allowed
        self.max_body = max_fleet_body() if max_body is None else int(max_body)
        self.max_inflight = 8 * self.max_body if max_inflight is None else int(max_inflight)
        self.body_idle_s = float(body_idle_s)
        self.inflight = 0  # body bytes received by requests being served; one event loop: no lock

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "http" and not scope.get("root_path") and scope["path"] in self.allowed:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            try:
                too_long = length is not None and int(length) > self.max_body
            except ValueError:
                too_long = True  # a length that is not a number is not a request Flower sent
            if too_long:
                await _plain(send, 413, b"request body too large for the fleet address\n")
                return
            # HTTP/1.1: without a length or chunked transfer a request has no body (GET /health)
            chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
            need = int(length) if length is not None else (self.max_body if chunked else 0)
            if need and self.inflight + need > self.max_inflight:
                await _plain(send, 503, b"the fleet address is busy; retry\n")
                return
            counted = [0]  # this request's body bytes in self.inflight
            try:
                await self.app(scope, self._bounded(receive, counted, bool(need)), send)
            finally:
                self.inflight -= counted[0]
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _plain(send, 404, b"not served on the fleet address\n")

    def _bounded(self, receive, counted: list[int], has_body: bool):
        """``receive`` that counts the body's bytes into ``self.inflight`` (and ``counted[0]``)
        and reports a disconnect once the body passes ``max_body``, the bodies in flight pass
        ``max_inflight``, or the body stalls for ``body_idle_s`` seconds."""
        done = not has_body  # after the last body chunk receive() only waits for a disconnect: no deadline

        async def bounded():
            nonlocal done
            try:
                message = await (receive() if done else asyncio.wait_for(receive(), self.body_idle_s))
            except asyncio.TimeoutError:
                log.warning("fleet address: a request body stalled for %g s; the connection is dropped",
                            self.body_idle_s)
                return {"type": "http.disconnect"}
            if message.get("type") == "http.request":
                n = len(message.get("body", b""))
                counted[0] += n
                self.inflight += n
                done = done or not message.get("more_body", False)
                if counted[0] > self.max_body:
                    log.warning("fleet address: a request body passed %d bytes; the connection is dropped",
                                self.max_body)
                    return {"type": "http.disconnect"}
                if self.inflight > self.max_inflight:
                    log.warning("fleet address: bodies in flight passed %d bytes; a request is dropped (its "
                                "SuperNode retries)", self.max_inflight)
                    return {"type": "http.disconnect"}
            return message

        return bounded


async def _plain(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def secure_defaults(config: Any, ours: argparse.Namespace) -> str | None:
    """Why this SuperLink would be unsafe to expose, as one line, or None. What the docs tell a
    hospital to run must be safe, so each of these needs an explicit flag to pass:

    - the Control API (no authentication: whoever reaches it can start a run, which runs code
      on this server) on anything but loopback: ``--allow-private-control`` for a LAN
      address, and no flag for a public one (reach it over an SSH tunnel);
    - no TLS (``--insecure``) on a sites' port that is not loopback;
    - TLS without SuperNode authentication (``--enable-supernode-auth``): any holder of the CA
      certificate could join as a site; ``--allow-unauthenticated-nodes`` to accept that.
    """
    if not is_loopback_bind(config.host):
        if not (ours.allow_private_control and is_private_bind(config.host)):
            return (f"--host {config.host}: the Control API must listen on a loopback address (e.g. --host "
                    "127.0.0.1; it has no authentication); sites connect to --fleet-host"
                    + ("; --allow-private-control lets it listen on this LAN address"
                       if is_private_bind(config.host) else ""))
    if config.insecure and not config.simulation and not is_loopback_bind(ours.fleet_host):
        return (f"--insecure with --fleet-host {ours.fleet_host}: without TLS the sites' port must be a loopback "
                "address; give --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile (docs/federation.md)")
    if not config.insecure and not config.enable_supernode_auth and not ours.allow_unauthenticated_nodes:
        return ("sites are not authenticated: add --enable-supernode-auth and register each site's public key "
                "(docs/federation.md), or --allow-unauthenticated-nodes to let any holder of the CA certificate join")
    return None


def _split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m server.superlink", add_help=False)
    p.add_argument("--fleet-host", required=True, help="address SuperNodes connect to (e.g. 0.0.0.0)")
    p.add_argument("--fleet-port", type=int, required=True, help="port SuperNodes connect to (e.g. 9092)")
    p.add_argument("--allow-private-control", action="store_true",
                   help="let the Control API listen on a private (LAN) address; it has no authentication, so "
                        "anyone on that network could start a run")
    p.add_argument("--allow-unauthenticated-nodes", action="store_true",
                   help="serve TLS without --enable-supernode-auth: any holder of the CA certificate may join")
    if "-h" in argv or "--help" in argv:
        p.print_help()
        print("\nEvery other option is flower-superlink's (see flower-superlink --help); "
              "--host/--port are the coordinator-only address.")
        raise SystemExit(0)
    return p.parse_known_args(argv)


class _Server:
    """uvicorn.Server without its own signal handling: both listeners stop together."""

    def __new__(cls, config):  # a factory, so uvicorn is imported only when serving
        import uvicorn

        class Server(uvicorn.Server):
            @contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        return Server(config)


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (in use, not an address of this machine), or
    None. Checked before starting, so the refusal is one line rather than uvicorn's log."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return f"not an address ({exc})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _database_problem(database: str) -> str | None:
    """Why ``--database`` cannot hold the SuperLink's state, in one line; None when it can
    (its folder is made). A file that is not SQLite, a folder, or a folder under a file ended
    in sqlalchemy or FileExistsError tracebacks once the SuperLink had started."""
    if database in (":flwr-in-memory:", ":memory:") or "://" in database:
        return None
    path = Path(database).expanduser()
    above = next((d for d in path.absolute().parents if d.exists()), None)
    if above is not None and not above.is_dir():
        return f"--database {database}: {above} is a file, not a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--database {database}: its folder cannot be made ({exc.strerror or type(exc).__name__})"
    if path.is_dir():
        return f"--database {database}: is a folder; name a file (it is made on first start)"
    if path.exists():
        try:
            with open(path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            return f"--database {database}: cannot be read ({exc.strerror or type(exc).__name__})"
        if head and head != b"SQLite format 3\x00":
            return f"--database {database}: is not an SQLite database (another file at that path?)"
    return None


def _tls_problem(config: Any) -> str | None:
    """Why the TLS files cannot serve, in one line; None when they load (or there are none).
    Loaded here, before serving: inside uvicorn a certificate that does not load read as
    "a listener stopped by itself (could not bind ...?)"."""
    import ssl

    certfile, keyfile = getattr(config, "ssl_certfile", None), getattr(config, "ssl_keyfile", None)
    if not certfile and not keyfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError, TypeError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: do not load as a certificate and its key ({reason})"
    ca = getattr(config, "ssl_ca_certfile", None)
    if ca:
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            return f"--ssl-ca-certfile {ca}: does not load as a CA certificate ({reason})"
    return None


def serve(argv: list[str] | None = None) -> int:
    """Parse flower-superlink's options plus ``--fleet-host/--fleet-port`` and serve both listeners."""
    import importlib

    import uvicorn

    try:
        from flwr.supercore.http_logging import get_uvicorn_log_config
        from flwr.supercore.logger import console_handler
        from flwr.superlink.main import create_app

        # the module, not the function of the same name that flwr.superlink.cli exports
        fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
        fs._parse_superlink_lifespan_config, fs.SuperLinkLifespan  # noqa: B018 (present?)
    except (ImportError, AttributeError):
        import flwr

        print(f"server.superlink: error: Flower {flwr.__version__} lacks the SuperLink parts this launcher "
              "uses (written for Flower 1.42's HTTP SuperLink)", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    ours, flower_argv = _split_args(argv)
    if not 1 <= ours.fleet_port <= 65535:
        print(f"server.superlink: error: --fleet-port {ours.fleet_port}: a port is 1-65535", file=sys.stderr)
        return 2
    # Flower's own parser (it reads sys.argv): same options, same checks, same messages
    saved_argv, sys.argv = sys.argv, ["flower-superlink", *flower_argv]
    try:
        config = fs._parse_superlink_lifespan_config()
    finally:
        sys.argv = saved_argv
    refusal = secure_defaults(config, ours)
    if refusal:
        print(f"server.superlink: error: {refusal}", file=sys.stderr)
        return 2
    if (config.host, config.port) == (ours.fleet_host, ours.fleet_port):
        print("server.superlink: error: --fleet-host/--fleet-port must differ from --host/--port", file=sys.stderr)
        return 2
    for flags, host, port in (("--host/--port", config.host, config.port),
                              ("--fleet-host/--fleet-port", ours.fleet_host, ours.fleet_port)):
        problem = _bind_problem(host, port)
        if problem:
            print(f"server.superlink: error: {flags} {host}:{port}: {problem}", file=sys.stderr)
            return 2
    problem = _database_problem(config.database) or _tls_problem(config)
    if problem:
        print(f"server.superlink: error: {problem}", file=sys.stderr)
        return 2
    if config.database in (":flwr-in-memory:", ":memory:"):
        log.warning("no --database: registered SuperNodes and runs are forgotten when the SuperLink restarts")

    # The SuperExec and ServerApp this SuperLink starts connect back to --host:--port: never
    # through the coordinator's web proxy (gRPC would send even 127.0.0.1 there).
    os.environ.update(with_interpreter_bin(loopback_bypasses_proxy(os.environ, also=[config.host])))
    app = create_app(config, fs.SuperLinkLifespan)
    ssl = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    log_config = get_uvicorn_log_config(console_handler.level)
    control = _Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=True,
                                     log_config=log_config, workers=1, **ssl))
    fleet = _Server(uvicorn.Config(FleetOnly(app, fleet_paths()), host=ours.fleet_host, port=ours.fleet_port,
                                   lifespan="off", access_log=True, log_config=log_config, workers=1, **ssl))
    print(f"server.superlink: Control, Runtime and Fleet API on {config.host}:{config.port} (coordinator only); "
          f"Fleet API only on {ours.fleet_host}:{ours.fleet_port} (sites)", flush=True)

    async def main() -> bool:
        """Serve until a signal asks both listeners to stop (True), or one stops by itself (False)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def request_stop() -> None:
            stop.set()
            control.should_exit = fleet.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop)
        # the control listener first: its lifespan starts the SuperLink's state and SuperExec
        control_task = asyncio.create_task(control.serve())
        while not control.started and not control_task.done():
            await asyncio.sleep(0.05)
        fleet_task = asyncio.create_task(fleet.serve())
        await asyncio.wait([control_task, fleet_task], return_when=asyncio.FIRST_COMPLETED)
        control.should_exit = fleet.should_exit = True
        await asyncio.gather(control_task, fleet_task, return_exceptions=True)
        return stop.is_set()

    try:
        stopped_on_request = asyncio.run(main())
    except SystemExit:  # uvicorn exits when a port cannot be bound (it logged the reason above)
        stopped_on_request = False
    if not stopped_on_request:
        print(f"server.superlink: error: a listener stopped by itself (could not bind {config.host}:{config.port} "
              f"or {ours.fleet_host}:{ours.fleet_port}? see the log above); both are down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve())
