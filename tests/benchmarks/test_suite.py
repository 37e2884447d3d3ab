"""The benchmark suite's shared pieces: the JSON-line convention, the glyphs task, site splits."""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import command_line, emit_json, last_json_line, machine_line, machine_lines  # noqa: E402
from labelled_task import (CLASSES, TaskSize, class_partition, dirichlet_partition,  # noqa: E402
                           iid_partition, make_task, read_labels, render, split_sites)


def test_json_line_is_strict_one_line_and_found_last(capsys):
    line = emit_json({"bench": "x", "rate": float("nan"), "nested": {"a": 1.234567}, "ok": True})
    out = capsys.readouterr().out
    assert out == line + "\n" and line.endswith("}") and "\n" not in line
    assert json.loads(line) == {"bench": "x", "rate": None, "nested": {"a": 1.2346}, "ok": True}
    text = 'noise\n{"bench": "a", "v": 1}\n{"not": "a bench"}\n{"bench": "b", "v": 2}\ntrailing words'
    assert last_json_line(text) == {"bench": "b", "v": 2}
    assert last_json_line("no json here") is None
    with pytest.raises(ValueError, match="'bench' key"):
        emit_json({"rate": 1})


def test_report_header_names_date_machine_and_a_command_to_retype():
    root = BENCH.parent
    cmd = command_line("feed_satellite.py", ["--out", str(root / "benchmarks" / "results" / "x.md"), "--out2",
                                             "/elsewhere/y.md", "--samples", "8"])
    assert cmd == "python benchmarks/feed_satellite.py --out benchmarks/results/x.md --out2 /elsewhere/y.md --samples 8"
    lines = machine_lines()
    assert re.fullmatch(r"- Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", lines[0])
    assert re.fullmatch(r"- CPU: .+, (1 core|\d+ cores) available; GPU: .+", lines[1])
    with patch("common.cores", return_value=1):
        assert ", 1 core available; GPU: " in machine_lines()[1] and ", 1 core, GPU " in machine_line("cpu")
    assert any("torch " in line for line in lines)


def test_glyph_classes_render_differently_and_mirror_pairs_are_mirrors():
    img = render("disk", np.random.default_rng(0))
    assert img.shape == (32, 32) and img.dtype == np.uint8
    # same generator state -> same nuisance; L and J differ only by the mirrored glyph
    a, b = render("L", np.random.default_rng(7)), render("J", np.random.default_rng(7))
    assert not np.array_equal(a, b)
    assert len(CLASSES) == 8


def _border_share(masks: list[np.ndarray]) -> float:
    """Share of glyph masks with coverage on the frame's outermost pixels."""
    def touches(m):
        return bool(m[0].max() > 0.5 or m[-1].max() > 0.5 or m[:, 0].max() > 0.5 or m[:, -1].max() > 0.5)
    return float(np.mean([touches(m) for m in masks]))


def test_v3_glyphs_cross_the_frame_yet_stay_mostly_inside(monkeypatch):
    import labelled_task

    rng = np.random.default_rng(0)
    masks = [labelled_task._glyph_mask(c, rng) for c in ("disk", "square") * 100]
    # v3 (EDGE 0.5): many glyphs touch or cross the frame, which is what defeats raw pixels
    assert _border_share(masks) > 0.25
    # at least half the radius stays inside: a disk or square never loses most of its area
    assert min(float(m.sum()) for m in masks) > 0.3 * 7 ** 2 * np.pi / 2
    monkeypatch.setattr(labelled_task, "EDGE", 1.0)  # v2's placement: whole glyph inside
    rng = np.random.default_rng(0)
    assert _border_share([labelled_task._glyph_mask(c, rng) for c in ("disk", "square") * 100]) == 0.0


def test_dirichlet_partition_covers_every_image_once_with_skew():
    labels = [c for c in "abcdefgh" for _ in range(100)]
    parts = dirichlet_partition(labels, 4, alpha=0.5, seed=3, min_size=10)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(800)) and min(len(p) for p in parts) >= 10
    # label skew: some site has a class share far from the uniform 1/8
    shares = [max(sum(labels[i] == c for i in p) / len(p) for c in "abcdefgh") for p in parts]
    assert max(shares) > 0.25
    assert dirichlet_partition(labels, 4, 0.5, seed=3) == parts  # reproducible
    iid = iid_partition(800, 4, seed=0)
    assert sorted(i for p in iid for i in p) == list(range(800)) and {len(p) for p in iid} == {200}


def test_class_partition_gives_each_site_whole_disjoint_classes():
    labels = [c for c in "abcdefgh" for _ in range(10)]
    parts = class_partition(labels, 4, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(80))
    classes = [{labels[i] for i in p} for p in parts]
    assert [len(c) for c in classes] == [2, 2, 2, 2] and len(set().union(*classes)) == 8
    assert all(len(p) == 20 for p in parts)
    assert class_partition(labels, 4, seed=1) == parts and class_partition(labels, 4, seed=2) != parts


def test_task_folders_and_site_split_read_back(tmp_path):
    root = make_task(tmp_path / "glyphs", TaskSize(pool=5, eval_train=2, eval_test=2))
    names, labels = read_labels(root / "pool")
    assert len(names) == 40 and sorted(set(labels)) == sorted(CLASSES)
    assert all((root / "pool" / n).is_file() for n in names)
    sites = split_sites(root, "iid", n_sites=4, seed=0)
    site_names = [n for s in sites for n in read_labels(s)[0]]
    assert sorted(site_names) == sorted(names)
    assert all(len(list(s.glob("*.png"))) == len(read_labels(s)[0]) for s in sites)


def test_every_benchmark_accepts_device_and_quick_or_is_registered():
    from run_all import HELPERS, REGISTRY

    # Committed scripts only: a helper's script still being written is checked once it lands.
    try:
        tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=BENCH, capture_output=True, text=True).stdout.split()
    except FileNotFoundError:  # no git on this machine: every script present counts
        tracked = []
    # Top-level scripts only, as run_all discovers them: benchmarks/notes/ holds diagnostics.
    scripts = [BENCH / name for name in tracked if "/" not in name] if tracked else sorted(BENCH.glob("*.py"))
    for script in scripts:
        if script.stem in HELPERS or not script.exists():
            continue
        text = script.read_text()
        assert "--device" in text or "add_device_arg" in text, f"{script.name} lacks --device"
        assert "emit_json" in text, f"{script.name} prints no JSON line"
        assert "--quick" in text or script.stem in REGISTRY, f"{script.name}: no --quick and no run_all entry"


def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--device", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "--device cuda: no CUDA device is visible to torch"


@pytest.mark.parametrize("script", ["moco_step.py", "round_overhead.py", "update_norms.py", "run_all.py"])
def test_a_device_that_is_not_cpu_or_cuda_is_refused_in_one_line(script):
    """--device gpu gave torch's traceback in some scripts and ran on the CPU, exit 0, in others;
    run_all passed mps on to every script (found by an audit)."""
    proc = subprocess.run([sys.executable, str(BENCH / script), "--device", "gpu", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("expected cpu, cuda or cuda:N, got 'gpu'") or \
        proc.stderr.strip() == "--device gpu: expected cpu, cuda or cuda:N"


def test_the_full_suite_on_a_gpu_times_moco_step_at_the_batch_its_targets_were_set_at(tmp_path):
    """run_all's full arguments timed moco_step at batch 32 on every device, and would have
    overwritten the batch-256 GPU figures the 11.3 targets are read from (found by an audit)."""
    from run_all import bench_args

    cuda = bench_args("moco_step", False, "cuda", 8, tmp_path / "o.md")
    assert cuda[cuda.index("--batch-size") + 1] == "256" and cuda[cuda.index("--steps") + 1] == "15"
    cpu = bench_args("moco_step", False, "cpu", 1, tmp_path / "o.md")
    assert cpu[cpu.index("--batch-size") + 1] == "32"


def test_the_timing_pair_is_trained_again_not_read_back_from_the_last_run(tmp_path):
    """quality.py read the timing pair's result.json back from the last run's cache, so every full
    suite after the first re-reported old timings (found by an audit). The pair's folder is
    emptied first; run_jobs then finds no cached result and trains."""
    import quality

    folder = tmp_path / "timing" / "runs" / "full"
    stale = folder / "fedmoco-0-abc" / "result.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"job": {}, "s_per_epoch": 0.335}')
    assert quality.fresh_folder(folder) == folder and folder.is_dir() and not any(folder.iterdir())
    assert "fresh_folder(args.timing_work" in (BENCH / "quality.py").read_text()  # the pair's folder, every run
    # and a table whose rows came from the cache says so beside its total time
    assert quality.read_back_note([{"read_back": True}, {}, {"read_back": True}]) == (
        "; 2 of 3 runs read back from earlier runs' results (--work), not trained now")
    assert quality.read_back_note([{}]) == ""


def test_timing_target_reads_the_side_by_side_pair_before_the_loaded_table():
    from run_all import TARGETS

    target = next(t for t in TARGETS if t.issue == "11.6" and "wall time" in t.text)
    loaded = {"fedmoco_s_per_epoch": 13.6, "lightly_s_per_epoch": 8.0}
    assert target.value(loaded) == pytest.approx(1.7)
    assert not target.ok(target.value(loaded))
    paired = {**loaded, "pair_fedmoco_s_per_epoch": 5.8, "pair_lightly_s_per_epoch": 5.8}
    assert target.value(paired) == pytest.approx(1.0)
    assert target.ok(target.value(paired))


def test_a_prototype_setting_without_a_big_bucket_misses_the_83_targets_not_meets_them():
    """The 8.3 targets dropped a setting whose figure was null (no bucket of >= 200 images) and
    read 'met' on the others (found by an audit); 'from the 5th release on' read release 5 alone."""
    from run_all import TARGETS, check_targets

    good = [0.9] * 10
    record = {"bench": "prototype_signal", "cos_big_eps1.5_n4000_C8": {"rho0.5": None, "rho0.7": 0.9},
              "round1_cos_big_eps1.5_n4000_C8": {"rho0.5": None, "rho0.7": 0.9},
              "trajectory_C8_n4000": {"rho0.5_eps1.5": [0.9, 0.9, 0.9, 0.9, None, 0.9, 0.9, 0.9, 0.9, 0.9],
                                      "rho0.7_eps1.5": good}}
    rows = [r for r in check_targets({"prototype_signal": {"record": record, "status": "ok"}}, "cpu", False)
            if r[0] == "8.3"]
    assert [r[2] for r in rows] == ["MISSED"] * 3 and all(r[3].startswith("nan") for r in rows)
    record["trajectory_C8_n4000"]["rho0.5_eps1.5"] = [0.9, 0.9, 0.9, 0.9, 0.85, 0.79, 0.9, 0.9, 0.9, 0.9]
    fifth_on = next(t for t in TARGETS if t.issue == "8.3" and "5th release" in t.text)
    assert fifth_on.value(record) == pytest.approx(0.79)  # release 6 counts, not release 5 alone


def test_the_suite_passes_each_script_only_options_it_declares(tmp_path):
    """`make bench` must not hand a script an option its parser lacks: demo_tasks_probe passes
    `--out` on to `fedmoco pretrain`, which once made the suite give it `--out` too (exit 2).
    Each script's own `--help` is the reference (options may come from shared helpers)."""
    from run_all import bench_args, discover, takes_option

    assert takes_option('p.add_argument("--out", type=Path)', "--out")
    assert not takes_option('cli(["pretrain", "--out", str(work)])', "--out")
    names = discover()

    def help_text(name: str) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--help"], capture_output=True, text=True,
                              timeout=120)
        return proc.returncode, proc.stdout + proc.stderr

    # Four at a time: each imports torch (about 400 MB), and all of them at once took 6 GB.
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(names, pool.map(help_text, names)))
    for name in names:
        rc, out = helps[name]
        assert rc == 0, out
        declared = set(re.findall(r"(--[a-z][a-z0-9-]*)", out))
        for quick in (True, False):
            flags = [a for a in bench_args(name, quick, "cpu", 4, tmp_path / "r.md") if a.startswith("--")]
            missing = [f for f in flags if f not in declared]
            assert not missing, f"{name} (quick={quick}) is given {missing}"
            # and a script with a report option writes this run's report, never the committed
            # full run's (the feed benchmarks once overwrote benchmarks/results/feed_*.md)
            if "--out" in declared:
                assert "--out" in flags, f"{name} (quick={quick}) is not given --out"


def test_the_suite_keeps_the_benchmarks_caches_out_of_the_users_cache_folder(tmp_path, monkeypatch):
    """Benchmarks build datasets in temporary folders; their sample caches once piled up in
    ~/.cache/fedmoco (3.5 GB of orphans). The suite gives them a scratch folder, removed after,
    unless the user set FEDMOCO_CACHE_DIR."""
    import os

    import run_all

    seen = []

    def fake_run_one(name, args, timeout, log):
        folder = os.environ.get("FEDMOCO_CACHE_DIR")
        seen.append(folder)
        (Path(folder) / "samples").mkdir(parents=True)  # what a benchmark's cache would do
        return {"name": name, "command": "", "status": "ok", "seconds": 0.0, "record": {"bench": name},
                "tail": []}

    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    monkeypatch.setattr(run_all, "BENCH", tmp_path)  # results, logs and the page under tmp_path
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "discover", lambda: ["update_norms"])
    monkeypatch.setattr(run_all, "bench_args", lambda *args: [])
    monkeypatch.delenv("FEDMOCO_CACHE_DIR", raising=False)
    docs = tmp_path / "benchmarks.md"
    run_all.main(["--only", "update_norms", "--docs", str(docs)])
    assert seen and seen[0] and not Path(seen[0]).exists() and "FEDMOCO_CACHE_DIR" not in os.environ
    assert not str(seen[0]).startswith(str(Path.home() / ".cache"))
    mine = tmp_path / "mine"
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(mine))
    run_all.main(["--only", "update_norms", "--docs", str(docs)])
    assert seen[1] == str(mine) and (mine / "samples").is_dir()  # the user's own folder is kept


def test_server_memory_sites_reply_as_real_sites_do(tmp_path):
    """The synthetic sites of federation_server_memory must send what the server requires (every
    metric of REQUIRED_METRICS): when the metric set grew, the benchmark's replies were all rejected."""
    import federation_server_memory as fsm

    lines = fsm.measure("tiny", sites=2, rounds=2, keys_per_site=8, queue_size=64)
    rows = [line for line in lines if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2
    assert all(row.rstrip(" |").endswith("| 2") for row in rows), rows  # both sites accepted each round
    assert fsm.HEADLINE["tiny_peak_rss_mb"] > 0


def test_federation_summary_averages_the_last_rounds_and_skips_missing_values(tmp_path):
    from quality import LAST_ROUNDS, federation_summary

    rounds = [{"event": "round", "round": r, "queue-size": 10 * r, "emb-std": 0.01 * r,
               "global-share": float("nan") if r == 7 else 0.1} for r in range(1, 8)]
    rounds.insert(3, {"event": "run-start"})  # not a round: left out
    (tmp_path / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    out = federation_summary(tmp_path / "rounds.jsonl")
    assert LAST_ROUNDS == 5 and out["queue-size"] == 70
    assert out["emb-std-last5"] == pytest.approx((0.03 + 0.04 + 0.05 + 0.06 + 0.07) / 5)
    assert out["global-share-last5"] == pytest.approx(0.1)  # round 7's NaN skipped
    (tmp_path / "empty.jsonl").write_text("")
    assert federation_summary(tmp_path / "empty.jsonl") == {}  # a run that logged no round


def test_quick_runs_are_keyed_by_the_code_and_full_runs_keep_their_keys(tmp_path, monkeypatch):
    import quality

    for folder in ("fedmoco", "clients", "server", "domains/images", "benchmarks"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for name in ("quality.py", "labelled_task.py", "global_queue_benefit.py"):
        (tmp_path / "benchmarks" / name).write_text("# stand-in\n")
    (tmp_path / "fedmoco" / "moco.py").write_text("LOSS = 1\n")
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    before = quality.code_fingerprint()
    (tmp_path / "fedmoco" / "moco.py").write_text("LOSS = 2\n")  # an engine change: quick runs measure it
    assert quality.code_fingerprint() != before
    (tmp_path / "README.md").write_text("docs do not count\n")
    assert len(quality.code_fingerprint()) == 12
    # a full run's job signature carries no "code": the caches of the documented tables stay valid
    full = quality.Job(row="r", kind="raw", seed=0, root=str(tmp_path), setup=quality.Setup())
    calls = []
    monkeypatch.setattr(quality, "score", lambda *a, **k: calls.append(1) or {"knn": 1.0, "probe": 2.0})
    # run_job silences logging for its worker process; here it would silence every later test
    monkeypatch.setattr(quality.logging, "disable", lambda level: None)
    out = quality.run_job(full, str(tmp_path / "work"))
    assert "code" not in out["job"]["setup"] and calls == [1]


def test_a_quick_page_keeps_the_full_suites_verdicts_beside_its_own():
    import argparse

    import run_all

    args = argparse.Namespace(quick=True, device="cpu")
    quick = {"quality": {"name": "quality", "status": "ok", "record": {"bench": "quality"}, "seconds": 1.0}}
    header = run_all.targets_table(quick, args)[0]
    assert "quick verdict" in header and "full suite (saved): verdict" in header


@pytest.mark.parametrize("argv, message", [
    (["--only", "moco_stepp"], "--only: no benchmark named moco_stepp (benchmarks: moco_step, "),
    (["--skip", "nope"], "--skip: no benchmark named nope"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--budget", "-5"], "--budget must be > 0 seconds, got -5"),
    (["--device", "bogus"], "argument --device: expected cpu, cuda or cuda:N, got 'bogus'"),
    (["--device", "mps"], "argument --device: expected cpu, cuda or cuda:N, got 'mps'"),  # no script runs on it
])
def test_the_suite_refuses_bad_arguments_before_it_runs_or_rewrites_anything(tmp_path, monkeypatch, capsys,
                                                                               argv, message):
    """A typo in --only ran nothing, printed "0/0 benchmarks ok" and rewrote the page as an
    empty table; a --docs under a file failed only after every benchmark had run (found by an
    audit). Both are refused first, and the page is untouched."""
    import run_all

    page = tmp_path / "benchmarks.md"
    page.write_text("the page as it was\n")
    monkeypatch.setattr(run_all, "run_one", lambda *a, **k: pytest.fail("a benchmark ran"))
    with pytest.raises(SystemExit) as stop:
        run_all.main([*argv, "--docs", str(page)])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert page.read_text() == "the page as it was\n"
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        run_all.main(["--only", "moco_step", "--docs", str(tmp_path / "afile" / "x.md")])
    assert f"--docs {tmp_path / 'afile' / 'x.md'}: {tmp_path / 'afile'} is not a folder" in capsys.readouterr().err
