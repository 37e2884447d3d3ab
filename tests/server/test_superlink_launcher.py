"""server.superlink: the sites' listener passes only Fleet API paths; the Control API stays private."""

from __future__ import annotations

import asyncio

import pytest

from server.superlink import FleetOnly, fleet_paths, is_private_bind, serve


def _call(app, path: str, *, kind: str = "http", root_path: str = "") -> tuple[int | None, list[str]]:
    """(status sent, paths the wrapped app saw) for one request to ``app``."""
    seen: list[str] = []
    sent: list[dict] = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "path": path, "root_path": root_path, "method": "POST", "headers": []}
    asyncio.run(FleetOnly(inner, app)(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, seen


def test_fleet_paths_are_flowers_fleet_routes_and_health():
    paths = fleet_paths()
    assert {"/v1/fleet/pull-messages", "/v1/fleet/push-messages", "/v1/fleet/get-fab", "/health"} <= paths
    assert all(p == "/health" or p.startswith("/v1/fleet/") for p in paths)


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                                  "/v1/runtime/acquire-task", "/docs", "/openapi.json", "/v1/fleet/",
                                  "/v1/fleet/../control/start-run", "/v1/fleet/pull-messages/../../control/start-run",
                                  "//v1/fleet/pull-messages", "/v1/fleet/pull-messages/"])
def test_everything_but_fleet_paths_gets_404(path):
    status, seen = _call(fleet_paths(), path)
    assert status == 404 and seen == []


def test_fleet_paths_pass_through():
    for path in ("/v1/fleet/register-node", "/v1/fleet/pull-messages", "/health"):
        assert _call(fleet_paths(), path) == (200, [path])
    # a root_path (proxy prefix) would shift what Starlette routes on: refused
    assert _call(fleet_paths(), "/v1/fleet/pull-messages", root_path="/x") == (404, [])


def test_a_body_too_large_for_the_fleet_address_is_refused_before_it_is_read():
    """Flower reads a fleet request's whole body before it checks the node's signature: a
    stranger's oversized body is refused by its declared length (413, nothing read), and a
    body without a length is cut off once it passes the bound (a disconnect, not memory)."""
    seen_bodies: list[int] = []
    sent: list[dict] = []

    async def inner(scope, receive, send):
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            total += len(message["body"])
            if not message.get("more_body"):
                break
        seen_bodies.append(total)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        sent.append(message)

    chunks = iter([b"x" * 600] * 10)  # 6 kB in chunks of 600 bytes, with no declared length

    async def receive():
        return {"type": "http.request", "body": next(chunks, b""), "more_body": True}

    guard = FleetOnly(inner, fleet_paths(), max_body=1000)
    scope = {"type": "http", "path": "/v1/fleet/push-object", "root_path": "", "method": "POST",
             "headers": [(b"content-length", b"1500000000")]}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 413 and seen_bodies == []  # refused by its declared length
    sent.clear()
    asyncio.run(guard({**scope, "headers": [(b"transfer-encoding", b"chunked")]}, receive, send))
    assert seen_bodies == [600]  # the app got the first chunk, then a disconnect instead of the second
    assert guard.max_body == 1000 and FleetOnly(inner, fleet_paths()).max_body == 64 * 2**20


@pytest.mark.parametrize("host,private", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                          ("10.1.2.3", True), ("192.168.0.5", True), ("0.0.0.0", False),
                                          ("::", False), ("8.8.8.8", False), ("superlink.example.org", False)])
def test_control_address_must_be_private(host, private):
    assert is_private_bind(host) is private


def test_public_control_address_is_refused_before_anything_starts(capsys, tmp_path):
    rc = serve(["--fleet-host", "127.0.0.1", "--fleet-port", "1", "--host", "0.0.0.0", "--port", "2", "--insecure",
                "--database", str(tmp_path / "db")])
    assert rc == 2
    # the last line (Flower's own start-up warnings may come before it)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("server.superlink: error: --host 0.0.0.0: the Control API must listen on a loopback")


def _refusal(host="127.0.0.1", fleet_host="0.0.0.0", insecure=False, auth=True, **flags):
    from types import SimpleNamespace

    from server.superlink import secure_defaults

    config = SimpleNamespace(host=host, insecure=insecure, simulation=False, enable_supernode_auth=auth)
    ours = SimpleNamespace(**{"fleet_host": fleet_host, "allow_private_control": False,
                              "allow_unauthenticated_nodes": False, **flags})
    return secure_defaults(config, ours)


def test_what_the_docs_tell_a_hospital_to_run_passes():
    assert _refusal() is None  # TLS, node authentication, Control API on loopback
    assert _refusal(fleet_host="127.0.0.1", insecure=True, auth=False) is None  # a loopback test bed


@pytest.mark.parametrize("kwargs,message", [
    ({"host": "10.1.2.3"}, "--host 10.1.2.3: the Control API must listen on a loopback address (e.g. --host 127.0.0.1; "
                           "it has no authentication); sites connect to --fleet-host; --allow-private-control lets "
                           "it listen on this LAN address"),
    ({"host": "0.0.0.0", "allow_private_control": True}, "--host 0.0.0.0: the Control API must listen on a loopback"),
    ({"insecure": True, "auth": False}, "--insecure with --fleet-host 0.0.0.0: without TLS the sites' port must be "
                                        "a loopback address"),
    ({"auth": False}, "sites are not authenticated: add --enable-supernode-auth"),
])
def test_an_unsafe_superlink_needs_an_explicit_flag(kwargs, message):
    assert _refusal(**kwargs).startswith(message)


def test_the_explicit_flags_pass():
    assert _refusal(host="192.168.0.5", allow_private_control=True) is None
    assert _refusal(auth=False, allow_unauthenticated_nodes=True) is None


def test_no_flag_exposes_the_control_api_beyond_the_lan():
    """The Control API runs whatever app it is sent: a public address has no escape hatch (an
    undocumented --allow-public-control once had one); it is left to Flower's parser to refuse."""
    from server.superlink import _split_args

    ours, rest = _split_args(["--fleet-host", "0.0.0.0", "--fleet-port", "9092", "--allow-public-control"])
    assert rest == ["--allow-public-control"] and not hasattr(ours, "allow_public_control")
    assert _refusal(host="0.0.0.0", allow_private_control=True).startswith("--host 0.0.0.0: the Control API")
    assert _refusal(host="1.2.3.4", allow_private_control=True).startswith("--host 1.2.3.4:")


def test_a_port_that_cannot_be_listened_on_is_refused_before_anything_starts(capsys, tmp_path):
    import socket

    base = ["--fleet-host", "127.0.0.1", "--host", "127.0.0.1", "--insecure", "--database", str(tmp_path / "db")]
    assert serve([*base, "--fleet-port", "99999", "--port", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "server.superlink: error: --fleet-port 99999: a port is 1-65535")
    with socket.socket() as taken:  # a port something else already listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            control = free.getsockname()[1]
        assert serve([*base, "--fleet-port", str(port), "--port", str(control)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"server.superlink: error: --fleet-host/--fleet-port 127.0.0.1:{port}: Address already in use")


def test_the_superlinks_own_processes_reach_it_past_a_web_proxy(tmp_path, monkeypatch):
    """The SuperExec and ServerApp a SuperLink starts connect back to --host:--port over gRPC,
    which would send even that through the coordinator's web proxy: the launcher exempts
    loopback and --host before Flower's app exists (tests/fedmoco/test_network.py)."""
    import os
    import socket

    import flwr.superlink.main

    class Started(Exception):
        pass

    seen = {}

    def create_app(*args, **kwargs):
        seen.update(os.environ)
        raise Started

    monkeypatch.setattr(flwr.superlink.main, "create_app", create_app)
    monkeypatch.setenv("http_proxy", "http://proxy.hospital:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with pytest.raises(Started):
        serve(["--fleet-host", "127.0.0.1", "--fleet-port", str(ports[0]), "--host", "127.0.0.1", "--port",
               str(ports[1]), "--insecure", "--database", str(tmp_path / "db")])
    assert seen["no_proxy"] == seen["NO_PROXY"] == "127.0.0.1,localhost,::1"
    assert seen["http_proxy"] == "http://proxy.hospital:3128"


def test_bodies_served_together_are_bounded_and_one_more_is_asked_to_retry():
    """Each body is capped, but N connections could hold N x the cap: past the budget of body
    bytes in flight a request gets 503, which Flower's SuperNodes retry with back-off."""
    release = None
    served: list[str] = []

    async def inner(scope, receive, send):
        served.append(scope["path"])
        while (await receive()).get("more_body"):  # Flower reads the whole body first
            pass
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def request(length: int | None):
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        return {"type": "http", "path": "/v1/fleet/push-object", "root_path": "", "method": "POST",
                "headers": headers}

    def body(length: int | None):
        async def receive():
            return {"type": "http.request", "body": b"x" * (length or 0), "more_body": False}
        return receive

    async def main():
        nonlocal release
        release = asyncio.Event()
        guard = FleetOnly(inner, fleet_paths(), max_body=1000, max_inflight=1500)
        statuses: list[int] = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        first = asyncio.create_task(guard(request(900), body(900), send))
        for _ in range(100):  # until its body has arrived (the read runs under a deadline: a few loop turns)
            if guard.inflight:
                break
            await asyncio.sleep(0)
        assert guard.inflight == 900  # its body arrived and is held while it is served
        await guard(request(900), body(900), send)  # 1800 > 1500: busy
        small = asyncio.create_task(guard(request(100), body(100), send))  # fits beside the first
        for _ in range(100):
            if guard.inflight == 1000:
                break
            await asyncio.sleep(0)
        release.set()
        await first
        await small
        assert statuses[0] == 503 and sorted(statuses[1:]) == [200, 200] and guard.inflight == 0
        statuses.clear()
        await guard(request(None), body(None), send)  # no body (GET /health): never counted
        await guard(request(900), body(900), send)  # the first one's bytes were given back
        assert statuses == [200, 200]

    asyncio.run(main())


def test_strangers_idle_connections_cannot_hold_the_fleet_address_and_stalled_bodies_are_dropped():
    """8 connections each declaring 64 MiB and sending 2 bytes held the whole in-flight budget by
    their declared lengths, and every site got 503 for as long as they stayed (found by an audit).
    Bytes are counted as they arrive, and a body that stalls is dropped after body_idle_s."""
    outcomes: list[str] = []

    async def inner(scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                outcomes.append("dropped")
                return
            if not message.get("more_body"):
                break
        outcomes.append("read")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def request(length: int):
        return {"type": "http", "path": "/v1/fleet/push-object", "root_path": "", "method": "POST",
                "headers": [(b"content-length", str(length).encode())]}

    def stalling():
        sent = [False]

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": b"xx", "more_body": True}
            await asyncio.sleep(3600)  # a stranger that never sends the rest
        return receive

    async def honest(length):
        async def receive():
            return {"type": "http.request", "body": b"x" * length, "more_body": False}
        return receive

    async def main():
        guard = FleetOnly(inner, fleet_paths(), max_body=1000, max_inflight=8000, body_idle_s=0.2)
        statuses: list[int] = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        strangers = [asyncio.create_task(guard(request(1000), stalling(), send)) for _ in range(8)]
        await asyncio.sleep(0.05)
        assert guard.inflight == 16  # 8 x 2 bytes received, not 8 x 1000 declared
        await guard(request(1000), await honest(1000), send)  # a site's upload is served meanwhile
        assert statuses == [200] and outcomes == ["read"]
        await asyncio.gather(*strangers)  # each stalled body is dropped after 0.2 s
        assert outcomes.count("dropped") == 8 and guard.inflight == 0
        # bodies that do arrive count: past the budget mid-body the request is dropped
        small = FleetOnly(inner, fleet_paths(), max_body=1000, max_inflight=1500, body_idle_s=5)
        small.inflight = 1200  # bytes other requests hold
        outcomes.clear()
        await small(request(200), await honest(200), send)
        assert outcomes == ["read"]
        await small(request(400), await honest(400), send)  # 1200 + 400 > 1500 at admission: 503
        assert statuses[-1] == 503

    asyncio.run(main())


def test_a_database_or_certificate_that_cannot_serve_is_refused_before_anything_starts(capsys, tmp_path):
    """A --database under a file or that is not SQLite ended in FileExistsError and sqlalchemy
    tracebacks, and a certificate that does not load read as "could not bind ...?" (found by an
    audit). Each is one line naming the file, before any listener starts."""
    import socket

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = [str(a.getsockname()[1]), str(b.getsockname()[1])]
    base = ["--fleet-host", "127.0.0.1", "--fleet-port", ports[0], "--host", "127.0.0.1", "--port", ports[1]]
    (tmp_path / "afile").write_text("")
    (tmp_path / "notes.db").write_text("not a database")
    cases = [
        (["--insecure", "--database", str(tmp_path / "afile" / "x.db")], f"{tmp_path / 'afile'} is a file, not a folder"),
        (["--insecure", "--database", str(tmp_path / "notes.db")], "is not an SQLite database"),
        (["--insecure", "--database", str(tmp_path)], "is a folder; name a file"),
    ]
    pem = tmp_path / "bad.pem"
    pem.write_text("not a certificate\n")
    cases.append((["--database", str(tmp_path / "ok.db"), "--ssl-certfile", str(pem), "--ssl-keyfile", str(pem),
                   "--ssl-ca-certfile", str(pem), "--enable-supernode-auth"],
                  f"--ssl-certfile {pem} / --ssl-keyfile {pem}: do not load as a certificate and its key"))
    for extra, message in cases:
        assert serve([*base, *extra]) == 2, extra
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("server.superlink: error: --") and message in last, last
    assert not (tmp_path / "ok.db").exists()
