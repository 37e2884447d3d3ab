"""server.launch.stop_process: nothing a started process spawned outlives it."""

import os
import sys
import time

from server.launch import descendants, start_process, stop_process

# A parent that starts a child in a session of its own (as a SuperLink starts flwr-simulation),
# which starts a grandchild; each sleeps. The parent prints both pids.
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "print(g.pid, flush=True); time.sleep(120)"], start_new_session=True, stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as fh:  # a zombie waiting for its reaper counts as gone
        return fh.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_children_in_other_sessions_are_stopped_too(tmp_path):
    log = tmp_path / "spawner.log"
    proc = start_process([sys.executable, "-c", SPAWNER], env=dict(os.environ), log=log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(log.read_text().split()) < 2:
            time.sleep(0.05)
        child, grandchild = map(int, log.read_text().split())
        assert {child, grandchild} <= set(descendants(proc.pid))
        assert os.getsid(child) != os.getsid(proc.pid)  # out of reach of the process group
    finally:
        stop_process(proc, timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (_gone(child) and _gone(grandchild)):
        time.sleep(0.05)
    assert _gone(child) and _gone(grandchild)
    assert proc.returncode is not None


def test_a_started_process_dies_with_its_starter_even_on_sigkill(tmp_path):
    import signal
    import subprocess

    # the starter (a stand-in for server.simulation) starts a sleeper with start_process and
    # prints its pid; then the starter is SIGKILLed, which no handler of its own can see
    starter = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from pathlib import Path; from server.launch import start_process; "
        f"p = start_process([sys.executable, '-c', 'import time; time.sleep(120)'], env=dict(os.environ), "
        f"log=Path({str(tmp_path / 'sleeper.log')!r})); print(p.pid, flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        sleeper = int(starter.stdout.readline())
        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _gone(sleeper):
            time.sleep(0.05)
        assert _gone(sleeper)
    finally:
        starter.kill()


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The OS may offer a port again once its probe socket is closed: two listeners started one
    after the other must still get two ports (a SuperNode once lost that race and a deployment
    test waited for it until its timeout)."""
    import socket

    import server.launch as launch

    offered = iter([50001, 50001, 50001, 50002])

    class Probe:
        def __init__(self, *args):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(launch, "_HANDED_OUT", set())
    monkeypatch.setattr(socket, "socket", Probe)
    assert [launch.free_port(), launch.free_port()] == [50001, 50002]


def test_the_health_check_and_flowers_environment_bypass_a_web_proxy(tmp_path, monkeypatch):
    """Behind a hospital's web proxy (http_proxy / https_proxy set for every login), the health
    check of a SuperLink on 127.0.0.1 once went to the proxy and timed out; Flower's processes
    get loopback exempted too, and keep the proxy for everything else."""
    import http.server
    import threading

    from server.launch import flower_env, wait_healthy

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing answers there
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    proc = start_process([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ),
                         log=tmp_path / "sleeper.log")
    try:
        wait_healthy(server.server_address[1], proc, timeout=5)
    finally:
        stop_process(proc)
        server.shutdown()
    env = flower_env(tmp_path / "flwr-home")
    assert env["no_proxy"] == env["NO_PROXY"] == "127.0.0.1,localhost,::1"
    assert env["http_proxy"] == env["https_proxy"] == "http://127.0.0.1:9"


def test_a_simulation_starts_ray_with_no_more_cpus_than_its_sites_use():
    """Flower's actor pool starts one worker per CPU Ray has, whatever the number of sites."""
    from server.simulation import federation_config

    assert federation_config(3, cpus=64) == "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=3"
    assert federation_config(3, cpus=2).endswith("init-args-num-cpus=2")  # sites take turns
    assert federation_config(1, cpus_per_site=2, cpus=1).endswith("client-resources-num-cpus=2 init-args-num-cpus=2")


def test_a_simulation_never_joins_an_outside_ray_cluster(tmp_path, monkeypatch, capsys):
    """RAY_ADDRESS makes ray.init() join that cluster, whose workers would read the sites' folders."""
    from server.simulation import simulation_env

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    env = simulation_env(tmp_path / "flwr-home")
    assert "RAY_ADDRESS" not in env and env["FLWR_HOME"] == str(tmp_path / "flwr-home")
    assert capsys.readouterr().err == ("python -m server.simulation: RAY_ADDRESS=10.0.0.5:6379 is ignored; the "
                                       "simulation starts its own Ray on this machine\n")
    monkeypatch.delenv("RAY_ADDRESS")
    assert "RAY_ADDRESS" not in simulation_env(tmp_path / "flwr-home") and capsys.readouterr().err == ""
