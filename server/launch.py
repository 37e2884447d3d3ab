"""Starting and stopping Flower's processes (SuperLink, SuperNodes, ``flwr``) from Python.

Used by the simulation demo (``server.simulation``), the deployment example and the
integration tests. Every process gets its own session (process group), so
:func:`stop_process` ends it together with the children it spawned (SuperExec, ServerApp,
Ray workers) by process-group id, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable, Sequence

from fedmoco.network import loopback_bypasses_proxy, ray_tmpdir

#: Folder of the running interpreter's console scripts (flwr, flower-superlink, ...).
BIN_DIR = Path(sys.executable).parent


#: Ports :func:`free_port` has handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it), and never one this
    process handed out before: the OS may offer a port again as soon as its probe socket is
    closed, and two listeners started one after the other then race for it (a SuperNode lost
    that race to another and the federation waited for it until its timeout)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that this process has not handed out already")


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's commands: this interpreter's bin/ first on PATH (the
    SuperLink starts ``flower-superexec`` by name) and ``FLWR_HOME`` for its config and
    installed apps, so nothing touches the user's ~/.flwr; loopback exempt from any web proxy and
    a temporary folder short enough for Ray's sockets (fedmoco.network)."""
    env = loopback_bypasses_proxy(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    if short := ray_tmpdir(env):
        env["RAY_TMPDIR"] = short
    env.update(extra or {})
    return env


def flower_command(name: str) -> str:
    """Absolute path of Flower console script ``name`` next to this interpreter."""
    path = BIN_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; install flwr into this environment (pip install 'flwr[simulation]')")
    return str(path)


def die_with_parent() -> Callable[[], None] | None:
    """A ``Popen(preexec_fn=...)`` under which the child gets SIGTERM when the process that
    started it dies, even by SIGKILL, which no handler sees (Linux ``prctl(PR_SET_PDEATHSIG)``;
    None elsewhere). A SuperLink left behind keeps serving a run nobody watches. libc is
    loaded here, in the parent: between fork and exec the child may only make the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return set_death_signal


def start_process(args: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``args`` in a new session, stdout+stderr appended to ``log``; it is sent SIGTERM if
    this process dies (:func:`die_with_parent`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh: IO[bytes] = open(log, "ab")
    try:
        return subprocess.Popen(list(args), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent())
    finally:
        fh.close()  # the child holds its own descriptor


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` and every process descended from it, then
    SIGKILL what is left after ``timeout`` s.

    The descendants are collected before anything is signalled: a SuperLink starts
    ``flwr-simulation`` in a session of its own, and that starts Ray's servers and workers,
    so the group alone would leave them running (re-parented to init) after an interrupt.
    """
    others = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None or _group_alive(proc.pid) or others:
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_each(others, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)
                                               or any(_alive(pid) for pid in others)):
            time.sleep(0.1)
        _signal_group(proc.pid, signal.SIGKILL)
        _signal_each(others, signal.SIGKILL)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def descendants(pid: int) -> list[int]:
    """Every live process descended from ``pid`` (children, theirs, ...), from /proc; [] where
    there is no /proc. Read by hand: psutil is not a dependency for this one walk."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else []:
        fields = _stat_fields(entry.name)
        if fields:  # None: the process ended while being read
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, ...), or None when it is gone.
    The name may hold spaces and parentheses, so the split is after the last ")"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _send(kill: Callable[[int, int], None], target: int, sig: int) -> bool:
    """``kill(target, sig)`` (``os.kill`` or ``os.killpg``; signal 0 only asks); False when
    there is no such process or group (or it is not ours to signal)."""
    try:
        kill(target, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_each(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        _send(os.kill, pid, sig)


def _alive(pid: int) -> bool:
    """Running: a zombie (ended, not yet reaped by its parent) counts as gone."""
    fields = _stat_fields(pid)
    return _send(os.kill, pid, 0) and (fields is None or fields[0] != "Z")


def _signal_group(pgid: int, sig: int) -> None:
    _send(os.killpg, pgid, sig)


def _group_alive(pgid: int) -> bool:
    return _send(os.killpg, pgid, 0)


def wait_healthy(port: int, proc: subprocess.Popen, *, timeout: float = 60.0, log: Path | None = None,
                 cafile: Path | None = None) -> None:
    """Poll ``http(s)://127.0.0.1:PORT/health`` until it answers 200; raise if ``proc`` dies or
    time runs out. ``cafile``: the CA of a TLS SuperLink (then https, verified)."""
    deadline = time.monotonic() + timeout
    url = f"{'https' if cafile else 'http'}://127.0.0.1:{port}/health"
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    # Never through a proxy (http_proxy / https_proxy): it cannot reach this machine's loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before it was ready"
                               + (f"; see {log}:\n{tail(log)}" if log else ""))
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s" + (f"; see {log}:\n{tail(log)}" if log else ""))


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_connection(flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
