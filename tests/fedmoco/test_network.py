"""fedmoco.network: Flower's loopback connections never go through a web proxy, and Ray's
sockets fit Linux's path limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmoco.network import loopback_bypasses_proxy, ray_tmpdir

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing answers there

#: A call over loopback, as a SuperNode and its ClientApp (or a SuperLink and its ServerApp)
#: make them: httpx in Flower 1.42, gRPC in earlier releases. Each prints "ok" or the failure.
HTTPX_LOOPBACK_CALL = """
import http.server, threading, httpx
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=server.serve_forever, daemon=True).start()
try:
    print("ok" if httpx.get(f"http://127.0.0.1:{server.server_address[1]}/", timeout=5).status_code == 200 else "bad")
except httpx.HTTPError as exc:
    print(type(exc).__name__)
"""
GRPC_LOOPBACK_CALL = """
import grpc
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(2))
echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"Echo": echo})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
try:
    reply = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/t.T/Echo")(b"ping", timeout=5)
    print("ok" if reply == b"ping" else "bad")
except grpc.RpcError as exc:
    print(exc.code().name)
"""


def test_without_a_proxy_nothing_changes():
    env = {"PATH": "/usr/bin", "no_proxy": "example.org"}
    assert loopback_bypasses_proxy(env) == env


def test_a_proxy_keeps_its_exemptions_and_gains_loopback_once():
    env = {"https_proxy": "http://proxy.hospital:3128", "no_proxy": "pacs.local, 127.0.0.1", "PATH": "/usr/bin"}
    out = loopback_bypasses_proxy(env, also=["10.0.0.5"])
    assert out["no_proxy"] == out["NO_PROXY"] == "pacs.local,127.0.0.1,localhost,::1,10.0.0.5"
    assert out["https_proxy"] == env["https_proxy"] and out["PATH"] == "/usr/bin"  # the proxy stays for the rest
    assert "no_grpc_proxy" not in out
    assert loopback_bypasses_proxy(out, also=["10.0.0.5"]) == out
    assert env["no_proxy"] == "pacs.local, 127.0.0.1"  # a copy: the caller's mapping is left alone


def test_an_upper_case_exemption_is_not_hidden_by_a_new_lower_case_one():
    """urllib, requests and httpx read no_proxy before NO_PROXY: a site's NO_PROXY naming its
    SuperLink must survive in both, or the SuperNode's connection to it goes to the proxy."""
    out = loopback_bypasses_proxy({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "superlink.hospital.org"})
    assert out["no_proxy"] == out["NO_PROXY"] == "superlink.hospital.org,127.0.0.1,localhost,::1"
    import urllib.request

    assert urllib.request.proxy_bypass_environment("superlink.hospital.org", {"no": out["no_proxy"]})


def test_a_wildcard_exemption_is_left_whole():
    """urllib and requests honour ``*`` only as the whole value: appending hosts would send
    everything else to the proxy."""
    env = {"http_proxy": "http://proxy:3128", "no_proxy": "*"}
    assert loopback_bypasses_proxy(env) == env


def test_grpcs_own_exemption_list_gains_loopback_when_set():
    out = loopback_bypasses_proxy({"http_proxy": "http://proxy:3128", "no_grpc_proxy": "pacs.local"})
    assert out["no_grpc_proxy"] == "pacs.local,127.0.0.1,localhost,::1"


@pytest.mark.parametrize("code, failure", [(HTTPX_LOOPBACK_CALL, "ConnectError"),
                                           (GRPC_LOOPBACK_CALL, "UNAVAILABLE")], ids=["httpx", "grpc"])
def test_loopback_calls_fail_behind_a_proxy_unless_loopback_is_exempt(code, failure):
    """The failure this module exists for, shown with the clients Flower uses: with a proxy
    set, even a call to 127.0.0.1 goes to the proxy; the exempted environment gets through."""
    base = {"PATH": "/usr/bin:/bin", "http_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     timeout=60).stdout.strip()
    assert run(base) == failure
    assert run(loopback_bypasses_proxy(base)) == "ok"


@pytest.mark.parametrize("env, expected", [
    ({"TMPDIR": "/tmp"}, None),
    ({}, None),
    ({"TMPDIR": "/builds/ci-workspace/job-1234567890/tmp/pytest-tmp"}, "/tmp"),
    ({"TMPDIR": "/builds/ci-workspace/job-1234567890/tmp/pytest-tmp", "RAY_TMPDIR": "/r"}, None),
])
def test_ray_gets_a_short_temporary_folder_only_when_its_sockets_would_not_fit(monkeypatch, env, expected):
    monkeypatch.setattr(sys, "platform", "linux")
    assert ray_tmpdir(env) == expected


def test_ray_tmpdir_draws_the_line_at_the_socket_limit(monkeypatch):
    """Ray's plasma_store socket adds 61 bytes and up to 7 pid digits to its folder."""
    monkeypatch.setattr(sys, "platform", "linux")
    assert ray_tmpdir({"TMPDIR": "/" + "t" * 38}) is None  # 39 + 68 = 107: fits
    assert ray_tmpdir({"TMPDIR": "/" + "t" * 39}) == "/tmp"  # 108: does not
    assert ray_tmpdir({"TMPDIR": "/" + "é" * 20}) == "/tmp"  # 41 bytes, 21 characters
    monkeypatch.setattr(sys, "platform", "darwin")  # Ray uses /tmp there whatever TMPDIR says
    assert ray_tmpdir({"TMPDIR": "/" + "t" * 80}) is None


def test_the_interpreters_folder_joins_path_only_when_path_lacks_the_program(tmp_path):
    """A SuperNode run as .venv/bin/python -m clients.supernode without activating the venv
    died after starting: Flower starts flower-superexec by name (found by an audit)."""
    import os

    from fedmoco.network import with_interpreter_bin

    venv, other = tmp_path / "venv" / "bin", tmp_path / "other"
    venv.mkdir(parents=True)
    other.mkdir()
    program = venv / "flower-superexec"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    python = str(venv / "python")
    assert with_interpreter_bin({"PATH": str(other)}, python)["PATH"] == f"{venv}{os.pathsep}{other}"
    assert with_interpreter_bin({}, python)["PATH"] == str(venv)
    found = tmp_path / "found"
    found.mkdir()
    (found / "flower-superexec").write_text("#!/bin/sh\n")
    (found / "flower-superexec").chmod(0o755)
    assert with_interpreter_bin({"PATH": str(found)}, python) == {"PATH": str(found)}  # PATH already finds one
    assert with_interpreter_bin({"PATH": str(other)}, str(other / "python")) == {"PATH": str(other)}  # none beside it
