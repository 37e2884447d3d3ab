"""fedmoco.network: Flower's loopback connections never go through a web proxy, and Ray's
sockets fit Linux's path limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmoco.network import loopback_bypasses_proxy, ray_tmpdir

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing answers there

#: A gRPC call over loopback, as a SuperNode and its ClientApp (or a SuperLink and its
#: ServerApp) make them; prints "ok" or the status code.
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
    print("ok" if reply == b"ping" else "wrong reply")
except grpc.RpcError as exc:
    print(exc.code().name)
"""


def test_without_a_proxy_nothing_changes():
    env = {"PATH": "/usr/bin", "no_proxy": "example.org"}
    assert loopback_bypasses_proxy(env) == env


def test_a_proxy_keeps_its_exemptions_and_gains_loopback_once():
    env = {"https_proxy": "http://proxy.hospital:3128", "no_proxy": "pacs.local, 127.0.0.1", "PATH": "/usr/bin"}
    out = loopback_bypasses_proxy(env, also=["10.0.0.5"])
    assert out["no_proxy"] == "pacs.local,127.0.0.1,localhost,::1,10.0.0.5"
    assert out["NO_PROXY"] == "127.0.0.1,localhost,::1,10.0.0.5"
    assert out["https_proxy"] == env["https_proxy"] and out["PATH"] == "/usr/bin"  # the proxy stays for the rest
    assert loopback_bypasses_proxy(out, also=["10.0.0.5"]) == out
    assert env["no_proxy"] == "pacs.local, 127.0.0.1"  # a copy: the caller's mapping is left alone


def test_grpc_over_loopback_fails_behind_a_proxy_unless_loopback_is_exempt():
    """The failure this module exists for, shown with gRPC itself: with ``http_proxy`` set,
    even a call to 127.0.0.1 goes to the proxy; the exempted environment gets through."""
    base = {"PATH": "/usr/bin:/bin", "http_proxy": DEAD_PROXY}
    run = lambda env: subprocess.run([sys.executable, "-c", GRPC_LOOPBACK_CALL], env=env, capture_output=True,
                                     text=True, timeout=60).stdout.strip()
    assert run(base) == "UNAVAILABLE"
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
    monkeypatch.setattr(sys, "platform", "linux")
    assert ray_tmpdir({"TMPDIR": "/" + "t" * 40}) is None  # 41 + 66 = 107: fits
    assert ray_tmpdir({"TMPDIR": "/" + "t" * 41}) == "/tmp"  # 108: does not
    monkeypatch.setattr(sys, "platform", "darwin")  # Ray uses /tmp there whatever TMPDIR says
    assert ray_tmpdir({"TMPDIR": "/" + "t" * 80}) is None
