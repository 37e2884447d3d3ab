"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication, two sites.

Exactly the steps of docs/federation.md: credentials from examples/deployment/make_certs.py,
``flower-superlink`` with TLS and ``--enable-supernode-auth``, ``flwr supernode register``
for each site's public key, one ``flower-supernode`` per site with its node_config, then
``flwr run``. Every process is started in its own process group and stopped by that id
in the fixture's ``finally``, whatever happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from fedmoco.checkpoint import load_checkpoint
from fedmoco.pretrain import model_from_checkpoint
from server.launch import (flower_command, flower_env, free_port, start_process, stop_process, tail, wait_healthy,
                           write_connection)
from server.simulation import APP_DIR
from server.strategy import load_server_state

pytestmark = pytest.mark.slow
MAKE_CERTS = APP_DIR / "examples" / "deployment" / "make_certs.py"
SITES = ("hospital-a", "hospital-b")


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS + SuperNode auth) and one SuperNode per registered site."""
    from domains.medical.demo import make_demo_archive

    root = tmp_path_factory.mktemp("deployment")
    certs = root / "certs"
    made = subprocess.run([sys.executable, str(MAKE_CERTS), str(certs), *(f"--site={s}" for s in (*SITES, "rogue"))],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    port = free_port()
    cli_env = flower_env(root / "home-cli")
    write_connection(root / "home-cli", "fedmoco-tls", f"127.0.0.1:{port}", root_certificates=certs / "ca.crt")
    procs: list[subprocess.Popen] = []
    try:
        link_log = root / "superlink.log"
        link = start_process(
            [flower_command("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
             "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            env=flower_env(root / "home-link"), log=link_log, cwd=root)
        procs.append(link)
        wait_healthy(port, link, log=link_log, cafile=certs / "ca.crt")
        for site in SITES:
            reg = _run([flower_command("flwr"), "supernode", "register", str(certs / f"{site}.pub"), "fedmoco-tls"],
                       cli_env)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        nodes = {}
        for i, site in enumerate(SITES):
            data = make_demo_archive(root / "data" / site, n_patients=3, seed=10 + i, image_size=32)
            # hospital-a keeps its privacy ledger on disk; hospital-b only in Context.state
            node_config = f'domain="medical" data-path="{data}" dp-epsilon={4.0 + i} threads=1'
            if i == 0:
                node_config += f' state-dir="{root / "state" / site}"'
            log = root / f"supernode-{site}.log"
            proc = start_process(
                [flower_command("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                 "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / site),
                 "--port", str(free_port()), "--node-config", node_config],
                env=flower_env(root / f"home-{site}"), log=log, cwd=root)
            procs.append(proc)
            nodes[site] = (proc, log)
        yield {"root": root, "certs": certs, "port": port, "cli_env": cli_env, "nodes": nodes, "procs": procs,
               "link_log": link_log}
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_two_sites_two_rounds_over_tls(deployment):
    root = deployment["root"]
    out = root / "server"
    run_config = (f'num-server-rounds=2 out-dir="{out}" min-nodes=2 image-size=32 batch-size=16 '
                  'max-steps-per-epoch=2 key-sample-rate=0.3 dim=32 hidden-dim=64 round-timeout=120.0')
    t0 = time.perf_counter()
    run = _run([flower_command("flwr"), "run", str(APP_DIR), "fedmoco-tls", "--stream", "--run-config", run_config],
               deployment["cli_env"], timeout=150)
    seconds = time.perf_counter() - t0
    logs = "\n".join(f"--- {site}:\n{tail(log)}" for site, (_, log) in deployment["nodes"].items())
    assert (out / "encoder.pt").is_file(), f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\n{logs}"
    assert "round 2: 2/2 replies accepted" in run.stdout
    model = model_from_checkpoint(load_checkpoint(out / "encoder.pt"), out / "encoder.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_server_state(out / "server-state.pt")
    assert state["round"] == 2
    owners = state["queue"]["owner"][: state["queue"]["count"]]
    assert len(state["queue"]["sites"]) == 2 and len(set(owners.tolist())) == 2  # keys from both hospitals
    assert all(abs(float(n) - 1) < 1e-3 for n in state["queue"]["keys"][: state["queue"]["count"]].norm(dim=1))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rounds] == [2, 2]
    # both ledgers advanced once per round: Context.state survived between the per-message
    # ClientApp processes, and hospital-a's ledger is also on its disk
    assert sorted(s["dp-keys-releases"] for s in rounds[1]["sites"]) == [2.0, 2.0]
    assert (root / "state" / "hospital-a" / "key-ledger.pt").is_file()
    assert seconds < 120


def test_unregistered_supernode_is_refused(deployment):
    root, certs = deployment["root"], deployment["certs"]
    log = root / "supernode-rogue.log"
    rogue = start_process(
        [flower_command("flower-supernode"), "--superlink", f"127.0.0.1:{deployment['port']}",
         "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / "rogue"),
         "--port", str(free_port()), "--max-retries", "1", "--node-config", 'domain="medical" data-path="/nonexistent"'],
        env=flower_env(root / "home-rogue"), log=log, cwd=root)
    deployment["procs"].append(rogue)  # stopped by the fixture even if this test fails
    try:
        rogue.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was not refused within 60 s:\n{tail(log)}")
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in log.read_text(errors="replace")
    # the registered sites are connected, the rogue never was
    listing = _run([flower_command("flwr"), "supernode", "list", "fedmoco-tls", "--format", "json"],
                   deployment["cli_env"])
    assert listing.returncode == 0, listing.stderr
    nodes = json.loads(listing.stdout)["nodes"]
    assert len(nodes) == 2 and {n["status"] for n in nodes} == {"online"}, listing.stdout
