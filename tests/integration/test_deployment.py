"""A real, secured deployment on 127.0.0.1, and the outsider it must refuse.

The steps of docs/federation.md, in order: TLS credentials from
examples/deployment/make_certs.py; each site's key pair made by ``fedmoco keygen`` (only the
``.pub`` is used by the coordinator); the coordinator's Ed25519 app-signing key and
``fedmoco sign-app``; ``python -m server.superlink`` with TLS, SuperNode authentication and
``--database``, its Control API on one port (loopback only in a real deployment) and the
Fleet API alone on the sites' port; ``flwr supernode register`` of each site's public key;
one ``python -m clients.supernode --trusted-entities`` per site; ``flwr run`` of the signed app.

The outsider holds ``ca.crt`` and a key of its own, and reaches only the sites' port: it is
refused at ``flwr supernode register``, ``flwr ls``, ``flwr run`` and as a SuperNode. An
unsigned app started by the coordinator is refused by every SuperNode before any of its
code runs. Every process is started in its own process group and stopped by that id.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmoco.appsign import copy_app_files
from fedmoco.checkpoint import load_checkpoint
from fedmoco.cli import main as fedmoco_main
from fedmoco.pretrain import model_from_checkpoint
from server.launch import (flower_command, flower_env, free_port, start_process, stop_process, tail, wait_healthy,
                           write_connection)
from server.simulation import APP_DIR
from server.strategy import load_server_state

pytestmark = pytest.mark.slow
MAKE_CERTS = APP_DIR / "examples" / "deployment" / "make_certs.py"
SITES = ("hospital-a", "hospital-b")
SIGNER = "fedmoco-coordinator"
SMALL_RUN = ('image-size=32 batch-size=16 max-steps-per-epoch=2 key-sample-rate=0.3 dim=32 hidden-dim=64 '
             'min-nodes=2 round-timeout=240.0 key-release="prototypes"')  # sharing on: the default is none


def _run(args: list[str], env: dict[str, str], timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _fedmoco(*args: str) -> subprocess.CompletedProcess:
    """``fedmoco ARGS`` in this process (the same code as the console script, without a
    torch import per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fedmoco_main(list(args))
    return subprocess.CompletedProcess(["fedmoco", *args], rc, out.getvalue(), err.getvalue())


def _start_superlink(root: Path, certs: Path, control_port: int, fleet_port: int) -> subprocess.Popen:
    log = root / "superlink.log"
    link = start_process(
        [sys.executable, "-m", "server.superlink", "--fleet-host", "127.0.0.1", "--fleet-port", str(fleet_port),
         "--host", "127.0.0.1", "--port", str(control_port), "--database", str(root / "superlink" / "state.db"),
         "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
         "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
         "--disable-runtime-dependency-installation"],
        env=flower_env(root / "home-link", {"PYTHONPATH": str(APP_DIR)}), log=log, cwd=root)
    wait_healthy(control_port, link, log=log, cafile=certs / "ca.crt")
    wait_healthy(fleet_port, link, log=log, cafile=certs / "ca.crt")
    return link


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS, SuperNode auth, --database, Control API apart) and one checked SuperNode per site."""
    from domains.medical.demo import make_demo_archive

    root = tmp_path_factory.mktemp("deployment")
    certs = root / "certs"
    made = subprocess.run([sys.executable, str(MAKE_CERTS), str(certs)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    # each site, and the outsider, make their own key pair on their own machine
    for who in (*SITES, "outsider"):
        made = _fedmoco("keygen", "--out", str(root / who / "keys"), "--name", who)
        assert made.returncode == 0 and "send this file to the coordinator" in made.stdout, made.stderr
    # the coordinator's app-signing key; its public line goes into every site's trusted-entities
    made = _fedmoco("keygen", "--out", str(root / "coordinator" / "keys"), "--name", SIGNER, "--type", "ed25519")
    assert made.returncode == 0, made.stderr
    trusted_line = made.stdout.strip().splitlines()[-1]
    assert trusted_line.startswith(f'{SIGNER}: "ssh-ed25519 ')
    # the files flwr run sends from this repository, once unsigned and once signed
    unsigned = copy_app_files(APP_DIR, root / "coordinator" / "app-unsigned")
    app = Path(shutil.copytree(unsigned, root / "coordinator" / "app"))
    signed = _fedmoco("sign-app", str(app), "--key", str(root / "coordinator" / "keys" / SIGNER), "--key-id", SIGNER)
    assert signed.returncode == 0, signed.stderr

    control_port, fleet_port = free_port(), free_port()
    cli_env = flower_env(root / "home-cli")
    write_connection(root / "home-cli", "fedmoco-tls", f"127.0.0.1:{control_port}", root_certificates=certs / "ca.crt")
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_superlink(root, certs, control_port, fleet_port))
        for site in SITES:  # only the public key reaches the coordinator
            reg = _run([flower_command("flwr"), "supernode", "register", str(root / site / "keys" / f"{site}.pub"),
                        "fedmoco-tls"], cli_env)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        nodes = {}
        for i, site in enumerate(SITES):
            data = make_demo_archive(root / site / "data", n_patients=3, seed=10 + i, image_size=32)
            (root / site / "trusted-entities.yaml").write_text(trusted_line + "\n")
            # each site keeps its privacy ledger and training state on its own disk
            node_config = (f'site-name="{site}" domain="medical" data-path="{data}" dp-epsilon={4.0 + i} '
                           f'threads=1 state-dir="{root / site / "state"}"')
            log = root / f"supernode-{site}.log"
            proc = start_process(
                [sys.executable, "-m", "clients.supernode", "--superlink", f"127.0.0.1:{fleet_port}",
                 "--trusted-entities", str(root / site / "trusted-entities.yaml"),
                 "--root-certificates", str(certs / "ca.crt"),
                 "--auth-supernode-private-key", str(root / site / "keys" / site),
                 "--port", str(free_port()), "--node-config", node_config],
                env=flower_env(root / site / "flwr-home", {"PYTHONPATH": str(APP_DIR)}), log=log, cwd=root)
            procs.append(proc)
            nodes[site] = (proc, log)
        yield {"root": root, "certs": certs, "control_port": control_port, "fleet_port": fleet_port, "app": app,
               "unsigned_app": unsigned, "cli_env": cli_env, "nodes": nodes, "procs": procs}
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def _node_logs(deployment) -> str:
    return "\n".join(f"--- {site}:\n{tail(log)}" for site, (_, log) in deployment["nodes"].items())


def test_two_sites_two_rounds_of_the_signed_app(deployment):
    root = deployment["root"]
    out = root / "server"
    run = _run([flower_command("flwr"), "run", str(deployment["app"]), "fedmoco-tls", "--stream", "--run-config",
                f'num-server-rounds=2 out-dir="{out}" {SMALL_RUN}'], deployment["cli_env"], timeout=400)
    assert (out / "encoder.pt").is_file(), f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\n{_node_logs(deployment)}"
    assert "round 2: 2/2 replies accepted" in run.stdout
    for _, log in deployment["nodes"].values():
        assert "verified (signed by a trusted entity)" in log.read_text(errors="replace")
    model = model_from_checkpoint(load_checkpoint(out / "encoder.pt"), out / "encoder.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_server_state(out / "server-state.pt")
    assert state["round"] == 2
    owners = state["queue"]["owner"][: state["queue"]["count"]]
    assert len(state["queue"]["sites"]) == 2 and len(set(owners.tolist())) == 2  # keys from both hospitals
    assert all(abs(float(n) - 1) < 1e-3 for n in state["queue"]["keys"][: state["queue"]["count"]].norm(dim=1))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rounds] == [2, 2]
    # both ledgers advanced once per round, across the per-message ClientApp processes, on each site's disk
    assert sorted(s["dp-keys-releases"] for s in rounds[1]["sites"]) == [2.0, 2.0]
    assert all(any((root / site / "state").glob("*ledger*")) for site in SITES)


def test_a_new_flwr_run_cannot_reset_a_sites_budget(deployment):
    """The budget belongs to the site: a new run (new run id, new out-dir, new ClientApp
    processes) finds each site's ledger on its disk. The ledger's plan (the num-server-rounds
    of the run that opened it, docs/privacy.md) is spent, so the new run gets no release, and
    the coordinator is told why, with the site's own figures."""
    from fedmoco.ledger import read_ledger
    from fedmoco.site_settings import LEDGER_FILE

    root = deployment["root"]
    ledgers = {site: root / site / "state" / LEDGER_FILE for site in SITES}

    def flwr_run(out: Path) -> list[dict]:
        run = _run([flower_command("flwr"), "run", str(deployment["app"]), "fedmoco-tls", "--stream",
                    "--run-config", f'num-server-rounds=1 out-dir="{out}" {SMALL_RUN}'], deployment["cli_env"],
                   timeout=400)
        assert (out / "encoder.pt").is_file(), f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\n{_node_logs(deployment)}"
        return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]

    if not all(path.is_file() for path in ledgers.values()):  # run alone: open the ledgers first
        flwr_run(root / "server-opening-run")
    before = {site: read_ledger(path) for site, path in ledgers.items()}
    rounds = flwr_run(root / "server-new-run")
    for site, path in ledgers.items():
        after = read_ledger(path)
        assert after.history == before[site].history and after.spent() == before[site].spent()
        assert after.epsilon_budget == 4.0 + SITES.index(site)  # the site's node_config, not the run's
    reported = {s["site"]: s for s in rounds[0]["sites"]}
    for site in SITES:
        assert reported[site]["dp-reason"] == "privacy budget exhausted" and reported[site]["dp-status"] == 5.0
        assert reported[site]["dp-keys-releases"] == before[site].releases
        assert reported[site]["dp-keys-epsilon"] == pytest.approx(before[site].spent())


def _outsider_env(deployment) -> dict[str, str]:
    """An outsider's flwr: ca.crt, and the only address it can reach, the sites' port."""
    home = deployment["root"] / "outsider" / "flwr-home"
    write_connection(home, "target", f"127.0.0.1:{deployment['fleet_port']}",
                     root_certificates=deployment["certs"] / "ca.crt")
    return flower_env(home)


def _runs(deployment) -> list[dict]:
    listing = _run([flower_command("flwr"), "ls", "fedmoco-tls", "--format", "json"], deployment["cli_env"])
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return json.loads(listing.stdout)["runs"]


def test_outsider_is_refused_at_register_ls_and_run(deployment):
    env, root = _outsider_env(deployment), deployment["root"]
    runs_before = _runs(deployment)
    register = _run([flower_command("flwr"), "supernode", "register",
                     str(root / "outsider" / "keys" / "outsider.pub"), "target"], env)
    assert register.returncode != 0 and "registered successfully" not in register.stdout
    assert "404 Not Found" in register.stdout + register.stderr
    listing = _run([flower_command("flwr"), "ls", "target"], env)
    assert listing.returncode != 0 and "404 Not Found" in listing.stdout + listing.stderr
    run = _run([flower_command("flwr"), "run", str(deployment["app"]), "target"], env)
    assert run.returncode != 0 and "404 Not Found" in run.stdout + run.stderr
    # nothing reached the SuperLink: no new run, no new node
    assert len(_runs(deployment)) == len(runs_before)
    nodes = _run([flower_command("flwr"), "supernode", "list", "fedmoco-tls", "--format", "json"],
                 deployment["cli_env"])
    assert nodes.returncode == 0 and len(json.loads(nodes.stdout)["nodes"]) == 2, nodes.stdout + nodes.stderr


def test_unregistered_supernode_is_refused(deployment):
    root = deployment["root"]
    log = root / "supernode-outsider.log"
    rogue = start_process(
        [flower_command("flower-supernode"), "--superlink", f"127.0.0.1:{deployment['fleet_port']}",
         "--root-certificates", str(deployment["certs"] / "ca.crt"),
         "--auth-supernode-private-key", str(root / "outsider" / "keys" / "outsider"),
         "--port", str(free_port()), "--max-retries", "1", "--node-config", 'domain="medical" data-path="/nonexistent"'],
        env=flower_env(root / "outsider" / "supernode-home"), log=log, cwd=root)
    deployment["procs"].append(rogue)  # stopped by the fixture even if this test fails
    try:
        rogue.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was not refused within 60 s:\n{tail(log)}")
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in log.read_text(errors="replace")
    listing = _run([flower_command("flwr"), "supernode", "list", "fedmoco-tls", "--format", "json"],
                   deployment["cli_env"])
    assert listing.returncode == 0, listing.stderr
    nodes = json.loads(listing.stdout)["nodes"]
    assert len(nodes) == 2 and {n["status"] for n in nodes} == {"online"}, listing.stdout


def test_supernodes_refuse_an_unsigned_app(deployment):
    root = deployment["root"]
    out = root / "server-unsigned"
    run = _run([flower_command("flwr"), "run", str(deployment["unsigned_app"]), "fedmoco-tls", "--stream", "--run-config",
                f'num-server-rounds=1 out-dir="{out}" {SMALL_RUN}'], deployment["cli_env"], timeout=120)
    for site, (_, log) in deployment["nodes"].items():
        text = log.read_text(errors="replace")
        assert "refused app" in text and "the app is not signed" in text, f"{site}:\n{tail(log)}"
    assert not (out / "encoder.pt").exists(), run.stdout[-2000:]
    assert "0/2 replies accepted" in run.stdout or "replies accepted" not in run.stdout, run.stdout[-2000:]


def test_registrations_survive_a_superlink_restart(deployment):
    """--database: the restarted SuperLink still knows both sites (and refuses no one it registered)."""
    root, procs = deployment["root"], deployment["procs"]
    stop_process(procs[0])
    procs[0] = _start_superlink(root, deployment["certs"], deployment["control_port"], deployment["fleet_port"])
    listing = _run([flower_command("flwr"), "supernode", "list", "fedmoco-tls", "--format", "json"],
                   deployment["cli_env"])
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert len(json.loads(listing.stdout)["nodes"]) == 2, listing.stdout
