"""The process environment Flower's processes need on a machine behind a web proxy, or with a
long temporary folder.

A SuperNode and the ClientApp it starts, and a SuperLink and its ServerApp, talk to each other
over 127.0.0.1 (httpx in Flower 1.42, gRPC before). httpx, gRPC and urllib send every
connection through ``http_proxy`` / ``https_proxy`` / ``all_proxy`` when one is set and the host
is not in ``no_proxy``, loopback included: the proxy cannot reach this machine's 127.0.0.1, so
each round failed and the health check timed out. Hospital networks commonly set a proxy for every login.
:func:`loopback_bypasses_proxy` keeps the proxy for everything else (a SuperNode may need it to
reach the SuperLink) and only exempts loopback.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import tempfile
from typing import Mapping, Sequence

#: Hosts that never go through a proxy: this machine.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Proxy variables httpx, gRPC and urllib read.
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
#: Linux caps a UNIX socket path at 107 bytes. Ray's longest, ``<tmp>/ray/session_<26-character
#: date>_<pid>/sockets/plasma_store``, adds 61 bytes and the pid's digits to its temporary folder;
#: 7 digits is the most a pid has (Linux's pid_max is at most 4194304).
RAY_SOCKET_SUFFIX = 61 + 7
UNIX_PATH_MAX = 107


def bind_address(host: str):
    """``host`` as an IP address (``localhost`` as 127.0.0.1), or None for any other name,
    which could resolve to anything."""
    try:
        return ipaddress.ip_address("127.0.0.1" if host == "localhost" else host.strip("[]"))
    except ValueError:
        return None


def is_private_bind(host: str) -> bool:
    """True for a loopback or private (RFC 1918 / ULA) address or ``localhost``; False for
    wildcard and public addresses (and for names)."""
    ip = bind_address(host)
    return ip is not None and not ip.is_unspecified and (ip.is_loopback or ip.is_private)


def is_loopback_bind(host: str) -> bool:
    """True for a loopback address or ``localhost``."""
    ip = bind_address(host)
    return ip is not None and ip.is_loopback


def loopback_bypasses_proxy(env: Mapping[str, str], also: Sequence[str] = ()) -> dict[str, str]:
    """A copy of ``env`` whose proxy exemptions also name :data:`LOOPBACK` and the hosts in
    ``also`` (a SuperLink's own private address) when a proxy variable is set; unchanged
    otherwise, or when ``no_proxy`` is ``*`` (nothing goes through the proxy already).

    ``no_proxy`` and ``NO_PROXY`` both get the union of their entries (kept, in order) and the
    new hosts: urllib, requests and httpx read the lower-case one first, so adding loopback to
    it alone would hide an upper-case-only ``NO_PROXY`` from them. gRPC reads
    ``no_grpc_proxy`` before ``no_proxy``, so that one, when set, gains the hosts too."""
    out = dict(env)
    if not any(out.get(name) for name in PROXY_VARS):
        return out
    entries = lambda name: [h.strip() for h in out.get(name, "").split(",") if h.strip()]
    if "*" in entries("no_proxy") + entries("NO_PROXY"):
        return out
    merged = list(dict.fromkeys([*entries("no_proxy"), *entries("NO_PROXY"), *LOOPBACK, *also]))
    out["no_proxy"] = out["NO_PROXY"] = ",".join(merged)
    if out.get("no_grpc_proxy"):
        out["no_grpc_proxy"] = ",".join(dict.fromkeys([*entries("no_grpc_proxy"), *LOOPBACK, *also]))
    return out


def with_interpreter_bin(env: Mapping[str, str], executable: str = sys.executable,
                         program: str = "flower-superexec") -> dict[str, str]:
    """A copy of ``env`` whose ``PATH`` starts with the folder of ``executable`` (the running
    Python) when that folder holds ``program`` and ``PATH`` finds none. The SuperLink and the
    SuperNode start ``flower-superexec`` by name: run as ``.venv/bin/python -m ...`` without
    activating the environment, a SuperNode died after starting with FileNotFoundError."""
    out = dict(env)
    folder = os.path.dirname(executable)
    if shutil.which(program, path=out.get("PATH", "")) is None and os.access(os.path.join(folder, program), os.X_OK):
        out["PATH"] = folder + (os.pathsep + out["PATH"] if out.get("PATH") else "")
    return out


def ray_tmpdir(env: Mapping[str, str]) -> str | None:
    """A temporary folder for Ray when the one it would use leaves its sockets' paths over
    Linux's 107-byte limit (``$TMPDIR`` of more than 39 bytes; Ray then fails with
    "AF_UNIX path length cannot exceed 107 bytes"), else None. Ray reads ``$TMPDIR`` on Linux
    only and ``/tmp`` elsewhere, unless ``$RAY_TMPDIR`` is set, which is then left alone."""
    if env.get("RAY_TMPDIR") or not sys.platform.startswith("linux"):
        return None
    current = env.get("TMPDIR") or "/tmp"
    if len(os.fsencode(current.rstrip("/"))) + RAY_SOCKET_SUFFIX <= UNIX_PATH_MAX:
        return None
    for short in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(short) and os.access(short, os.W_OK | os.X_OK):
            return short
    return tempfile.gettempdir()  # nothing shorter to offer: Ray names the problem itself
