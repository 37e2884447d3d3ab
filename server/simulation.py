"""Federated simulation on this machine, offline: ``python -m server.simulation``.

1. generates one demo archive per site (``domains.<domain>.demo``) under ``OUT/data/site-<i>``
   and, playing each site's admin, its settings file ``OUT/data/site-<i>/fedmoco-site.toml``:
   a privacy budget (:data:`DEMO_BUDGET`) and a ledger outside the data folder,
   ``OUT/site-state/site-<i>/privacy-ledger.json`` (``--no-site-budget``: no file, the sites
   then share weights only);
2. starts a simulation SuperLink (``flower-superlink --insecure --simulation
   --disable-runtime-dependency-installation``) on free ports, with its own ``FLWR_HOME``;
   Flower's ``:local:`` connection would run ``uv sync`` per run and needs the internet;
3. ``flwr run . fedmoco-sim --stream --federation-config "num-supernodes=N ..."
   --run-config "demo-root=OUT/data out-dir=OUT/server ..."``: simulated site ``i``
   (node_config ``partition-id`` = i) reads ``<demo-root>/site-<i>``;
4. stops the SuperLink and everything it started (process group), even on failure.

The satellite federation is the same command with ``--domain satellite`` (which sets
run_config ``domain="satellite" in-channels=4``).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from clients.ledger import LEDGER_FILE, read_ledger
from clients.task import SITE_FILE_KEYS, run_value
from fedmoco.cli import with_defaults
from fedmoco.data import SITE_SETTINGS_FILE
from fedmoco.errors import ConfigError, FedmocoError, reports_os_errors
from fedmoco.metrics import read_jsonl
from server.launch import (die_with_parent, flower_command, flower_env, free_port, start_process, stop_process, tail,
                           wait_healthy, write_connection)
from server.runs import last_run_id, no_update_message, validate_run_config

#: Repository root: the Flower app (pyproject.toml with [tool.flwr.app]).
APP_DIR = Path(__file__).resolve().parent.parent
#: Input channels of each domain's demo archive.
DEMO_CHANNELS = {"medical": 1, "satellite": 4, "images": 1}
#: Smallest image size each demo generator writes (measured: JPEG 2000 encoding of the
#: medical archive fails below 32 px, satellite tiles need 16).
DEMO_MIN_SIZE = {"medical": 32, "satellite": 16, "images": 8}
#: Federation units (run_config input-mean / input-std) of the generated images and satellite
#: archives, rounded from their statistics: the coordinator fixes them, so every site feeds
#: the encoder the same units and may release DP summaries (with each site's own statistics
#: one image would move every summary: such a site refuses, docs/privacy.md). The medical
#: domain windows each slice to fixed constants and needs none.
DEMO_UNITS = {"images": {"input-mean": "0.33", "input-std": "0.26"},
              "satellite": {"input-mean": "0.08,0.09,0.09,0.2", "input-std": "0.04,0.05,0.09,0.15"}}


#: The budget each simulated site's admin gives it (its fedmoco-site.toml). epsilon 8 is the
#: loopback deployment's (examples/deployment), so both demos share alike. Demo sites hold
#: 28-42 images, far below the hundreds per bucket a prototype needs at epsilon 1.5
#: (docs/privacy.md); on 3 medical demo sites, 3 rounds, one run each (noise is not seeded),
#: the global queue gained 3, 4, 3 prototypes per round at epsilon 8 and 3, 0, 1 at epsilon
#: 1.5. delta 1e-5 is the default and below 1 / n at every demo site. A real site sets its own.
DEMO_BUDGET: dict[str, float] = {"dp-epsilon": 8.0, "dp-delta": 1e-5}


def make_demo_sites(domain: str, root: Path, n_sites: int, *, image_size: int = 64, seed: int = 0,
                    budget: Mapping[str, float] | None = DEMO_BUDGET, state_root: Path | None = None,
                    keep_ledgers: bool = False) -> list[Path]:
    """One generated archive per site under ``root/site-<i>``; different seeds, different sites.

    With a ``budget`` each site also gets its settings file (:func:`write_site_settings`)
    with a ledger under ``state_root/site-<i>`` (default ``root/../site-state``), outside its
    data; ``budget=None``: no settings file, the site shares weights only. The archives are
    the same for the same arguments; ``keep_ledgers`` (a resumed run) keeps what each
    site's ledger has spent.
    """
    paths = []
    for i in range(n_sites):
        out = root / f"site-{i}"
        if out.exists():
            shutil.rmtree(out)
        if domain == "medical":
            from domains.medical.demo import make_demo_archive
            make_demo_archive(out, n_patients=4 + i, seed=seed + i, image_size=image_size)
        elif domain == "satellite":
            from domains.satellite.demo import make_demo_archive
            make_demo_archive(out, bands=DEMO_CHANNELS["satellite"], seed=seed + i, tile_size=image_size)
        elif domain == "images":
            from domains.images import make_demo_images
            make_demo_images(out, n_per_class=8 + 4 * i, size=image_size, seed=seed + i, rgb=False)
        else:
            raise ValueError(f"no demo archive for domain {domain!r}; choose one of {sorted(DEMO_CHANNELS)}")
        paths.append(out)
    if budget is not None:
        write_site_settings(paths, (root.parent / "site-state") if state_root is None else state_root, budget,
                            keep_ledgers=keep_ledgers)
    return paths


def write_site_settings(site_dirs: list[Path], state_root: Path,
                        budget: Mapping[str, float] = DEMO_BUDGET, *, keep_ledgers: bool = False) -> list[Path]:
    """Play each site's admin: write ``<site_dirs[i]>/fedmoco-site.toml`` with ``budget`` and the
    ledger ``state_root/site-<i>/privacy-ledger.json`` (absolute, outside the data folder).

    For a new run the generated data is new, so a ledger left there by an earlier demo (about
    data that no longer exists) is removed with its folder: a new site starts with its whole
    budget. ``keep_ledgers`` (a resumed run, the same data) keeps them: what a site spent stays
    spent. Returns the settings files' paths.
    """
    unknown = sorted(set(budget) - set(SITE_FILE_KEYS))
    if unknown:
        raise ValueError(f"not site settings: {', '.join(unknown)}")
    files = []
    for i, site in enumerate(site_dirs):
        state = (state_root / f"site-{i}").resolve()
        if not keep_ledgers:
            shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True, exist_ok=True)
        settings = {**budget, "ledger-path": str(state / LEDGER_FILE)}
        path = site / SITE_SETTINGS_FILE
        path.write_text("# this site's own settings (docs/privacy.md); node_config wins over them\n"
                        + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
        files.append(path)
    return files


def queue_summary(metrics: Path, state_root: Path | None = None) -> str:
    """One line on the global queue after the last round in ``metrics`` (a server's
    rounds.jsonl): prototypes held, from how many sites, added that round, how much of the
    InfoNCE softmax the global negatives took in it (``global-share``), and (with
    ``state_root``, as :func:`write_site_settings` lays it out) each site's ledger:
    epsilon spent of its budget. Says why when no site shared."""
    rounds = [r for r in read_jsonl(metrics) if r.get("event") == "round"] if metrics.is_file() else []
    if not rounds:
        return f"global queue: no finished round in {metrics}"
    last = rounds[-1]
    line = (f"global queue: {last.get('queue-size', 0)} DP summaries from {last.get('queue-sites', 0)} site(s) after "
            f"round {last['round']} ({last.get('queue-added', 0)} added in it, {last.get('dp-sharing', 0)} of "
            f"{last.get('accepted', 0)} sites sharing)")
    share = last.get("global-share")
    if isinstance(share, (int, float)) and share > 0:
        line += f"; the global negatives took {100 * share:.1f}% of the sites' InfoNCE softmax in that round"
    spent = []
    for ledger_file in sorted(state_root.glob(f"site-*/{LEDGER_FILE}")) if state_root else []:
        try:
            ledger = read_ledger(ledger_file)
        except ConfigError:
            ledger = None
        if ledger is not None:
            spent.append(f"{ledger_file.parent.name} {ledger.spent():.3g}/{ledger.epsilon_budget:g}")
    if spent:
        line += f"; epsilon spent per site: {', '.join(spent)} (delta {ledger.delta:g})"
    reasons = sorted({s["dp-reason"] for s in last.get("sites", []) if s.get("dp-reason")})
    if not last.get("dp-sharing") and reasons:
        line += f"; not sharing: {'; '.join(reasons)}"
    return line


def toml_value(v: Any) -> str:
    """A Python value as a TOML literal for ``--run-config``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


#: One ``key=value`` of --run-config: a quoted value may hold spaces (as in Flower's own
#: parser, flwr.common.config.parse_config_args, which takes TOML values only, no bare words).
_PAIR = re.compile(r"""([^\s=]+)=('[^']*'|"(?:[^"\\]|\\.)*"|\S*)""")


def parse_overrides(*texts: str) -> dict[str, Any]:
    """``'k=1 name="x" out-dir="/tmp/my dir"'`` -> ``{"k": 1, "name": "x", "out-dir": "/tmp/my dir"}``
    (TOML values; bare words are strings). Several texts (``--run-config`` given several times)
    merge in order: later keys win. ConfigError for text that is not pairs, or an unclosed quote."""
    out: dict[str, Any] = {}
    for text in texts:
        pos = 0
        while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
            m = _PAIR.match(text, pos)
            if not m:
                raise ConfigError(f"--run-config: expected key=value pairs separated by spaces, got "
                                  f"{text[pos:].split()[0]!r}")
            key, value = m.groups()
            try:
                out[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                if value[:1] in ("'", '"'):  # a quote that does not close: not a bare word
                    raise ConfigError(f"--run-config: {key}: the quote in {value!r} does not close") from None
                out[key] = value
            pos = m.end()
            if pos < len(text) and not text[pos].isspace():
                raise ConfigError(f"--run-config: expected key=value pairs separated by spaces, got "
                                  f"{text[m.start():].split()[0]!r}")
    return out


@dataclass
class SimulationResult:
    encoder: Path
    out_dir: Path
    seconds: float
    log: Path


def federation_config(num_supernodes: int, cpus_per_site: int = 1, cpus: int | None = None) -> str:
    """``flwr run --federation-config`` for ``num_supernodes`` sites of ``cpus_per_site`` CPUs.

    Ray is started with at most the CPUs the sites can use (``init-args-num-cpus``), never
    fewer than one site needs: Flower's actor pool starts one worker process per
    ``cpus_per_site`` CPUs Ray has, whatever the number of sites, so on a 64-core machine a
    3-site demo would otherwise start 64, each loading the app and torch when a round lands on
    it. ``cpus``: the CPUs this process may use (default: its affinity mask)."""
    have = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    ray_cpus = max(cpus_per_site, min(have, num_supernodes * cpus_per_site))
    return (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site} "
            f"init-args-num-cpus={ray_cpus}")


def simulation_env(flwr_home: Path) -> dict[str, str]:
    """Flower's environment (server.launch.flower_env) for a simulation, without ``RAY_ADDRESS``:
    with it, Flower's ``ray.init()`` joins that Ray cluster, whose workers, possibly on other
    machines, would then read the sites' folders. A simulation starts its own Ray here."""
    env = flower_env(flwr_home)
    if address := env.pop("RAY_ADDRESS", None):
        print(f"python -m server.simulation: RAY_ADDRESS={address} is ignored; the simulation starts "
              "its own Ray on this machine", file=sys.stderr)
    return env


def run_simulation(run_config: dict[str, Any], *, num_supernodes: int, work_dir: Path, cpus_per_site: int = 1,
                   timeout: float = 600.0, app_dir: Path = APP_DIR, echo: bool = True) -> SimulationResult:
    """Run the FedMoCo app in Flower's simulation runtime; ``run_config`` overrides pyproject's.

    ``work_dir`` receives ``flwr-home/`` (SuperLink config and installed app) and the logs.
    Raises RuntimeError (with the log's tail) if the run does not produce its encoder.
    """
    work_dir = work_dir.resolve()
    flwr_home = work_dir / "flwr-home"
    shutil.rmtree(flwr_home, ignore_errors=True)
    port = free_port()
    write_connection(flwr_home, "fedmoco-sim", f"127.0.0.1:{port}")
    env = simulation_env(flwr_home)
    link_log, run_log = work_dir / "superlink.log", work_dir / "flwr-run.log"
    for p in (link_log, run_log):
        p.unlink(missing_ok=True)
    out_dir = Path(str(run_config["out-dir"])).resolve()
    encoder = out_dir / "encoder.pt"
    # An earlier run's encoder stays until this run writes its own (a refused start, or a
    # resume that fails, must not cost it): success is a new file, told by its stamp.
    before = _stamp(encoder)
    t0 = time.perf_counter()
    superlink = start_process(
        [flower_command("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port)], env=env, log=link_log, cwd=work_dir)
    # Stops the SuperLink's flwr-simulation and Ray if this process is SIGKILLed (server.reaper):
    # they ran the federation to its end, spending the sites' budgets, with nobody watching.
    reaper = subprocess.Popen([sys.executable, "-m", "server.reaper", str(os.getpid()), str(superlink.pid)],
                              cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, superlink, log=link_log)
        cmd = [flower_command("flwr"), "run", str(app_dir), "fedmoco-sim", "--stream",
               "--federation-config", federation_config(num_supernodes, cpus_per_site),
               "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
        with open(run_log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=work_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent())
            # The limit is enforced while the output streams: reading stdout to its end would
            # otherwise wait as long as the run takes.
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                stop_process(proc)

            timer = threading.Timer(max(timeout - (time.perf_counter() - t0), 1.0), expire)
            coloured = sys.stdout.isatty()
            timer.daemon = True
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    fh.write(line)
                    if echo and _worth_echoing(line):
                        text = line.decode(errors="replace")
                        sys.stdout.write(text if coloured else _ANSI.sub("", text))
                        sys.stdout.flush()
                proc.wait()
            finally:
                timer.cancel()
                stop_process(proc)
            if expired.is_set():
                raise RuntimeError(f"the simulation did not finish within --timeout {timeout:g} s and was stopped; "
                                   f"flwr run log {run_log}:\n{tail(run_log)}")
    finally:
        stop_process(superlink)
        reaper.terminate()  # everything it watched is stopped
        reaper.wait()
    if _stamp(encoder) in (None, before):
        written = "without" if before is None else "without writing a new"
        raise RuntimeError(f"the simulation ended {written} {encoder}; flwr run log {run_log}:\n{tail(run_log)}\n"
                           f"SuperLink log {link_log}:\n{tail(link_log)}")
    return SimulationResult(encoder=encoder, out_dir=out_dir, seconds=time.perf_counter() - t0, log=run_log)


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, inode) of ``path``, None when it does not exist: an atomic rewrite changes both."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_ino


# Flower streams every log line twice: once through its handler, once from the captured
# stream with a "MM/DD/YYYY HH:MM:SS:LEVEL:" prefix. The second copy is skipped.
_DUPLICATE = re.compile(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")


# Flower colours its log levels; a log file or a pipe gets the text without the escapes.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _worth_echoing(line: bytes) -> bool:
    """The federation's one-line messages and errors, once; not Ray's or Flower's chatter.
    The encoder's path is not among them: the closing summary prints it."""
    text = line.decode(errors="replace")
    if _DUPLICATE.search(text):
        return False
    return any(s in text for s in ("round ", "ERROR", "resuming", "site data", "held an earlier run"))


@reports_os_errors("python -m server.simulation")  # an output folder that cannot be made: one line, exit 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.simulation", description=__doc__.splitlines()[0])
    p.add_argument("--domain", default="medical", choices=sorted(DEMO_CHANNELS), help="the generated sites' data")
    p.add_argument("--sites", type=int, default=3, help="simulated sites (SuperNodes)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--out", type=Path, default=Path("demo-output/federation"),
                   help="output folder: data/, site-state/, server/ and the logs")
    p.add_argument("--image-size", type=int, default=64, help="input size in pixels")
    p.add_argument("--run-config", action="append", default=[],
                   help="extra run_config overrides, 'k=v k2=\"text\"'; may be given several times, "
                        "later keys win")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the whole federation may take")
    p.add_argument("--no-site-budget", action="store_true",
                   help="give the generated sites no privacy budget (no fedmoco-site.toml): weights only, "
                        "no global queue")
    with_defaults(p)
    args = p.parse_args(argv)
    try:
        run_config = simulation_run_config(args)
    except FedmocoError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".simulation.lock", "a+") as lock:  # released when this run ends, whatever ends it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{p.prog}: error: another simulation is running into {out}; wait for it, or give another --out",
                  file=sys.stderr)
            return 2
        return _simulate(p, args, run_config, out)


def _simulate(p: argparse.ArgumentParser, args: argparse.Namespace, run_config: dict[str, Any], out: Path) -> int:
    resume = run_value(run_config, "resume")  # "false" (a quoted TOML string) is no, as the server reads it
    server_out = Path(run_value(run_config, "out-dir")).expanduser().resolve()  # --run-config may move it
    if resume:
        from server.app import resume_state

        try:  # what the ServerApp would refuse, refused before the sites' data is made again
            resume_state(run_config)
        except FedmocoError as exc:
            print(f"{p.prog}: error: {exc}", file=sys.stderr)
            return 2
    print(f"generating {args.sites} {args.domain} site archive(s) under {out / 'data'}", flush=True)
    try:
        make_demo_sites(args.domain, out / "data", args.sites, image_size=args.image_size,
                        budget=None if args.no_site_budget else DEMO_BUDGET, state_root=out / "site-state",
                        keep_ledgers=resume)
    except KeyboardInterrupt:
        print(f"\n{p.prog}: interrupted while generating the sites' data; no federation was started", file=sys.stderr)
        return 130
    if not args.no_site_budget:
        print(f"site budgets: epsilon {DEMO_BUDGET['dp-epsilon']:g}, delta {DEMO_BUDGET['dp-delta']:g} per site "
              f"(data/site-<i>/{SITE_SETTINGS_FILE}), ledgers under {out / 'site-state'}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedmoco-sim-") as tmp:
        work = Path(tmp)
        try:
            result = run_simulation(run_config, num_supernodes=args.sites, work_dir=work, timeout=args.timeout)
        except (RuntimeError, KeyboardInterrupt) as exc:
            # the logs outlive the temporary folder, and the message points at the copies
            text = str(exc)
            for name in ("flwr-run.log", "superlink.log"):
                if (work / name).exists():
                    shutil.copy(work / name, out / name)
                    text = text.replace(str(work.resolve() / name), str(out / name))
            if isinstance(exc, KeyboardInterrupt):  # run_simulation stopped every process it started
                print(f"\n{p.prog}: interrupted; the federation was stopped. Continue it with the same command and "
                      f"--run-config 'resume=true' (log: {out / 'flwr-run.log'})", file=sys.stderr)
                return 130
            failed = no_update_line(server_out / "rounds.jsonl", since=started)
            print(f"{p.prog}: error: {failed or text}", file=sys.stderr)
            return 1
        shutil.copy(result.log, out / "flwr-run.log")
    ran = rounds_since(server_out / "rounds.jsonl", started)
    print(f"\nfederated simulation: {args.sites} {args.domain} sites, {ran} round(s) in {result.seconds:.0f} s"
          + (f" (resumed; {run_config['num-server-rounds']} in all)" if resume else ""))
    print(f"aggregated encoder:   {result.encoder}")
    print(f"round metrics:        {server_out / 'rounds.jsonl'}")
    print(queue_summary(server_out / "rounds.jsonl", out / "site-state"))
    print(f"plots:                {server_out / 'plots'}")
    print(f"full log:             {out / 'flwr-run.log'}")
    return 0


def simulation_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run_config of ``python -m server.simulation ARGS``, validated (ConfigError)."""
    for flag, value in (("--sites", args.sites), ("--rounds", args.rounds)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.image_size < DEMO_MIN_SIZE[args.domain]:
        raise ConfigError(f"--image-size must be >= {DEMO_MIN_SIZE[args.domain]} for the generated {args.domain} "
                          f"archives, got {args.image_size}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout}")
    out = args.out.resolve()
    run_config: dict[str, Any] = {
        "domain": args.domain, "in-channels": DEMO_CHANNELS[args.domain], "image-size": args.image_size,
        "num-server-rounds": args.rounds, "demo-root": str(out / "data"), "out-dir": str(out / "server"),
        "min-nodes": args.sites, "local-epochs": 2, "batch-size": 16, "resume": False,
        # demo archives hold ~30 images per site: a larger key sample keeps the global queue visibly busy
        "key-sample-rate": 0.3, **DEMO_UNITS.get(args.domain, {}),
    }
    run_config.update(parse_overrides(*args.run_config))
    # Flower runs the ServerApp in a temporary folder: a relative out-dir wrote every output
    # there, deleted at exit, and the run failed as if it had written nothing (found by an audit).
    for key in ("out-dir", "demo-root"):
        if isinstance(run_config.get(key), str) and run_config[key]:
            run_config[key] = str(Path(run_config[key]).expanduser().resolve())
    validate_run_config(run_config)
    check_simulated_sites(run_config, args.sites)
    return run_config


def check_simulated_sites(run_config: dict[str, Any], sites: int) -> None:
    """ConfigError when the run waits for more sites than the simulation starts: every round
    would wait (min-nodes) or fail (min-replies) until the timeout."""
    for key in ("min-nodes", "min-replies"):
        if run_value(run_config, key) > sites:
            raise ConfigError(f"run_config {key} {run_value(run_config, key)} is more than the {sites} simulated "
                              "site(s) (--sites)")


def rounds_since(metrics: Path, since: float) -> int:
    """Rounds that ``metrics`` (rounds.jsonl) logged at or after ``since`` (UNIX time)."""
    if not metrics.is_file():
        return 0
    return sum(1 for r in read_jsonl(metrics) if r.get("event") == "round" and float(r.get("time", 0)) >= since)


def no_update_line(metrics: Path, *, since: float = 0.0) -> str | None:
    """One line when the last run in ``metrics`` (rounds.jsonl), logging after ``since``
    (UNIX time), updated the model in no round; None otherwise."""
    run_id = last_run_id(metrics)
    if run_id is None:
        return None
    run = [r for r in read_jsonl(metrics) if r.get("event") == "round" and r.get("run-id") == run_id]
    records = [r for r in run if float(r.get("time", 0)) >= since]
    if not records or any(r.get("updated") for r in run):  # a resumed run's earlier rounds count
        return None
    return no_update_message(records[-1].get("sites", []), len(records), metrics)


if __name__ == "__main__":
    # SIGTERM (kill, a scheduler) and SIGHUP (the terminal closed) stop the federation as Ctrl-C
    # does: every process this run started is stopped, and the line says how to resume.
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, signal.default_int_handler)  # raises KeyboardInterrupt
    sys.exit(main())
