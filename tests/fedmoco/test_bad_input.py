"""Bad input to the fedmoco command ends in one line naming the option or file, exit 2
(130 for Ctrl-C), never a traceback; runs resume as a user expects (issue 10)."""

from __future__ import annotations

import json

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedmoco.checkpoint import atomic_save, load_checkpoint
from fedmoco.cli import main
from fedmoco.metrics import read_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_images, tiny_pretrain_flags):
    """A finished 2-epoch tiny pretraining run (3 steps per epoch)."""
    out = tmp_path_factory.mktemp("bad-input") / "run"
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), "--no-plots",
                 *tiny_pretrain_flags]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("command,extra,message", [
    ("knn", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("knn", ["--k", "0"], "--k must be >= 1, got 0"),
    ("linear-probe", ["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    ("linear-probe", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("linear-probe", ["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    ("linear-probe", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("linear-probe", ["--epochs", "-5"], "--epochs must be >= 1, got -5"),
])
def test_evaluation_numbers_out_of_range(run_dir, demo_images, capsys, command, extra, message):
    rc = main(["-q", command, "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(demo_images), *extra])
    assert rc == 2
    assert one_error_line(capsys) == f"fedmoco {command}: error: {message}"
    assert not (run_dir / "eval" / f"{command}.json").exists()  # no result printed or written


def test_binary_labels_file(run_dir, demo_images, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"path,label\n" + bytes(range(256)) * 4)
    rc = main(["-q", "linear-probe", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(demo_images),
               "--labels", str(labels)])
    assert rc == 2
    assert one_error_line(capsys) == (f"fedmoco linear-probe: error: {labels}: labels CSV is not a text "
                                      "file (binary data at byte 11)")
    rc = main(["-q", "linear-probe", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(demo_images),
               "--labels", str(tmp_path)])
    assert rc == 2 and one_error_line(capsys) == f"fedmoco linear-probe: error: {tmp_path}: labels CSV is a folder, not a file"
    # text in another encoding is not "binary data": Excel's CSV on Windows (found by an audit)
    labels.write_bytes("path,label\ncircle/crème.png,a\n".encode("cp1252"))
    rc = main(["-q", "linear-probe", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(demo_images),
               "--labels", str(labels)])
    assert rc == 2
    assert one_error_line(capsys) == (f"fedmoco linear-probe: error: {labels}: labels CSV is not UTF-8 (byte 20 is "
                                      "not UTF-8 text; another encoding, such as Windows-1252? save it as "
                                      "\"CSV UTF-8\")")


def test_random_bytes_checkpoint(demo_images, tmp_path, capsys):
    junk = tmp_path / "encoder.pt"
    junk.write_bytes(os.urandom(4096))
    assert main(["-q", "knn", "--checkpoint", str(junk), "--data", str(demo_images)]) == 2
    line = one_error_line(capsys)
    assert line == (f"fedmoco knn: error: {junk}: not a readable checkpoint: not a PyTorch file "
                    "(damaged, truncated or another format)")
    assert "weights_only" not in line


def test_checkpoint_with_python_objects_is_refused_without_weights_only_advice(tmp_path, capsys, demo_images):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fedmoco-checkpoint", "x": os.system}, evil)  # loading it could run code
    assert main(["-q", "knn", "--checkpoint", str(evil), "--data", str(demo_images)]) == 2
    line = one_error_line(capsys)
    assert "holds Python objects other than tensors" in line and "weights_only" not in line


def test_other_domain_checkpoint_names_domains_not_options(run_dir, tmp_path, capsys):
    """An encoder of 4-band satellite tiles evaluated on medical data: the message is about
    domains and channels, not about a --data-option the user never passed."""
    from domains.medical.demo import make_demo_archive

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    ckpt["data"].update(domain="satellite", options={"bands": "1,2,3"}, normalization=None)
    sat = tmp_path / "satellite.pt"
    atomic_save(ckpt, sat)
    med = make_demo_archive(tmp_path / "med", n_patients=2, image_size=32, n_slices=2, labelled=True)
    assert main(["-q", "knn", "--checkpoint", str(sat), "--data", str(med), "--domain", "medical"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"fedmoco knn: error: {sat}: the encoder was trained on satellite data with 3 channel(s) "
                    f"but {med} read as medical gives 1")


def test_warmup_longer_than_the_run(demo_images, tmp_path, capsys, tiny_pretrain_args):
    rc = main(["-q", "pretrain", "--data", str(demo_images), "--out", str(tmp_path / "r"), *tiny_pretrain_args,
               "--warmup-epochs", "5", "--epochs", "1"])
    assert rc == 2
    assert one_error_line(capsys) == ("fedmoco pretrain: error: --warmup-epochs 5 is longer than the run "
                                      "(--epochs 1): the learning rate would never reach --lr")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


# -- resume ----------------------------------------------------------------------------------

def _lrs(path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(path) if "step" in r}


def test_resume_can_extend_epochs_and_follows_the_longer_schedule(demo_images, tmp_path, tiny_pretrain_args,
                                                                   capsys):
    base = ["-q", "pretrain", "--data", str(demo_images), "--no-plots", *tiny_pretrain_args]
    assert main([*base, "--out", str(tmp_path / "short")]) == 0  # 2 epochs
    assert main(["-q", "pretrain", "--data", str(demo_images), "--no-plots", "--out", str(tmp_path / "short"),
                 "--resume", "--epochs", "3"]) == 0  # settings come from the checkpoint
    assert main([*base, "--out", str(tmp_path / "long"), "--epochs", "3"]) == 0
    ckpt = load_checkpoint(tmp_path / "short" / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and ckpt["train_config"]["epochs"] == 3
    assert ckpt["train_config"]["batch_size"] == 16  # not the CLI default 64
    short, long = _lrs(tmp_path / "short" / "metrics.jsonl"), _lrs(tmp_path / "long" / "metrics.jsonl")
    assert sorted(short) == list(range(9))
    # the first two epochs followed the 2-epoch plan, the third the 3-epoch plan
    assert short[5] < long[5]
    for step in (6, 7, 8):
        assert short[step] == pytest.approx(long[step], rel=1e-9)


def test_resume_after_a_metrics_line_cut_short(demo_images, tmp_path, tiny_pretrain_args, capsys):
    """A run killed mid-write leaves half a JSON line; resuming skips it (with a warning naming
    the file and line) and the rewritten log parses line by line again."""
    out = tmp_path / "cut"
    base = ["-q", "pretrain", "--data", str(demo_images), "--no-plots", "--out", str(out)]
    assert main([*base, *tiny_pretrain_args]) == 0  # 2 epochs
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    capsys.readouterr()
    assert main([*base, "--resume", "--epochs", "3"]) == 0
    assert capsys.readouterr().err == (f"WARNING fedmoco.metrics: {metrics}:{len(lines)}: skipped a line that is "
                                       "not a JSON record (a write cut short?)\n")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sorted(r["step"] for r in records if "step" in r and "loss" in r) == list(range(9))


def test_plot_draws_the_records_written_whole_and_refuses_a_log_without_any(tmp_path, capsys):
    server = tmp_path / "server"
    server.mkdir()
    rounds = [{"event": "round", "round": r, "train-loss": 4.0, "sites": [], "queue-size": 0, "queue-added": 0,
               "queue-expired": 0} for r in (1, 2)]
    (server / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds) + '{"event": "round", "ro')
    assert main(["-q", "plot", str(server)]) == 0
    assert {p.name for p in (server / "plots").iterdir()} >= {"loss.png", "queue.png"}
    capsys.readouterr()
    (server / "rounds.jsonl").write_text('{"event": "round", "round": "x"}\nnot json\n')
    assert main(["-q", "plot", str(server)]) == 2
    err = capsys.readouterr().err.splitlines()  # a warning per line skipped, then the error
    assert "Traceback" not in "\n".join(err) and len(err) == 3
    assert err[-1] == f"fedmoco plot: error: {server / 'rounds.jsonl'}: holds no finished round to plot"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("garbage\n")
    (run / "config.json").write_text("{")
    assert main(["-q", "plot", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()  # config.json and the skipped line warned about, then the error
    assert "Traceback" not in "\n".join(err) and len(err) == 3
    assert err[-1] == f"fedmoco plot: error: {run / 'metrics.jsonl'}: no records to plot"


@pytest.mark.parametrize("command", ["keygen", "export", "pretrain"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, demo_images, run_dir, tiny_pretrain_args,
                                                          capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    argv = {"keygen": ["keygen", "--out", str(out), "--name", "site-a"],
            "export": ["export", str(run_dir / "checkpoint.pt"), "--out", str(out)],
            "pretrain": ["pretrain", "--data", str(demo_images), "--out", str(out), "--no-plots", *tiny_pretrain_args]}
    assert main(["-q", *argv[command]]) == 2
    assert one_error_line(capsys) == f"fedmoco {command}: error: {out}: Not a directory"


def test_resume_of_a_finished_run_says_so(run_dir, demo_images, capsys):
    before = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(run_dir), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"nothing to do: the run in {run_dir} has finished all 2 epochs; "
                                   "pass --epochs N > 2 with --resume to train further")
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("extra,message", [
    (["--image-size", "48"], "--image-size 48 (the run's: 32)"),
    (["--domain", "medical"], "--domain medical (the run's: images)"),
    (["--batch-size", "8"], "--batch-size 8 (the run's: 16)"),
])
def test_resume_with_conflicting_settings(run_dir, demo_images, capsys, extra, message):
    rc = main(["-q", "pretrain", "--data", str(demo_images), "--out", str(run_dir), "--resume", "--epochs", "3",
               *extra])
    assert rc == 2
    line = one_error_line(capsys)
    assert line == (f"fedmoco pretrain: error: {run_dir / 'checkpoint.pt'}: a resumed run keeps its settings; "
                    f"conflicting: {message}. Drop these options, or choose another --out for a new run")
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2


def test_resume_cannot_shrink_below_done_epochs(run_dir, demo_images, capsys):
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(run_dir), "--resume",
                 "--epochs", "1"]) == 2
    assert one_error_line(capsys) == (f"fedmoco pretrain: error: --epochs 1: the run in {run_dir} has already "
                                      "done 2 epochs")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_pretrain_says_how_to_resume(demo_images, tmp_path, tiny_pretrain_args, sig):
    """A real SIGINT (or SIGTERM, a scheduler's stop) to the console script once the first
    epoch is checkpointed."""
    out = tmp_path / "run"
    args = [a if a != "2" else "500" for a in tiny_pretrain_args]  # --epochs 500: still running when interrupted
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A user's Ctrl-C comes from a terminal, where SIGINT has its default action. A suite run in
    # the background of a non-interactive shell inherits SIGINT ignored, and so would the child.
    proc = subprocess.Popen([sys.executable, "-m", "fedmoco", "-q", "pretrain", "--data", str(demo_images),
                             "--out", str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "checkpoint.pt").exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fedmoco pretrain: interrupted; {out / 'checkpoint.pt'} holds epoch ")
    assert last.endswith(f"of 500; resume with: fedmoco pretrain --data {demo_images} --out {out} --workers 0 --resume")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1


def test_a_cuda_device_number_this_machine_lacks_is_one_line(monkeypatch):
    # "cuda:3" on a one-GPU machine failed later, deep in a run, with "invalid device ordinal"
    from fedmoco.device import select_device
    from fedmoco.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^--device cuda:3: this machine has 1 CUDA device\(s\), numbered from 0$"):
        select_device("cuda:3")
    assert select_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("name", ["gpu", "xla", "meta", "cuda:x"])
def test_a_device_fedmoco_does_not_train_on_is_named_with_the_choices(name):
    # "gpu" listed torch's twenty internal device types; "xla" or "meta" passed and failed later
    from fedmoco.device import select_device
    from fedmoco.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^--device {name}: expected auto, cpu, cuda, cuda:N or mps$"):
        select_device(name)
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", ["pretrain", "check-site"])
def test_an_image_size_beyond_the_federations_range_is_refused(demo_images, tmp_path, capsys, command):
    """--image-size 100000 ended in an allocator traceback asking for 30 GB (found by an audit);
    both commands now hold run_config's range."""
    extra = (["--out", str(tmp_path / "run")] if command == "pretrain" else ["--domain", "images"])
    rc = main(["-q", command, "--data", str(demo_images), "--image-size", "100000", *extra])
    assert rc == 2
    assert one_error_line(capsys) == f"fedmoco {command}: error: --image-size must be in [8, 4096], got 100000"
    assert not (tmp_path / "run").exists()


def _edited(run_dir, tmp_path, name, edit):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    edit(ckpt)
    out = tmp_path / name / "checkpoint.pt"
    out.parent.mkdir(parents=True)
    torch.save(ckpt, out)
    return out


def _other_channels(ckpt):
    first = next(k for k, v in ckpt["model"].items() if v.dim() == 4)
    ckpt["model"][first] = torch.zeros(ckpt["model"][first].shape[0], 4, *ckpt["model"][first].shape[2:])


@pytest.mark.parametrize("name, edit, problem", [
    ("no-data", lambda c: c.pop("data"), "not a usable fedmoco checkpoint: 'data' is missing or not a mapping"),
    ("data-none", lambda c: c.update(data=None), "'data' is missing or not a mapping"),
    ("bad-config", lambda c: c.update(moco_config="garbage"), "'moco_config' is missing or not a mapping"),
    ("bad-norm", lambda c: c["data"].update(normalization="x"),
     "data 'normalization' is not a mean and a positive std per channel"),
    ("bad-size", lambda c: c["data"].update(image_size=-5),
     "data 'image_size' is -5, expected a whole number in [8, 4096]"),
    ("bad-epoch", lambda c: c.update(epoch="x"), "'epoch' is 'x', expected a whole number >= 0"),
    ("other-channels", _other_channels, "does not load (Error(s) in loading state_dict for"),
])
def test_a_checkpoint_with_the_format_tag_and_other_contents_is_one_line(run_dir, demo_images, tmp_path, capsys,
                                                                          name, edit, problem):
    """Edited or foreign contents under fedmoco's format tag ended in KeyError, TypeError and
    size-mismatch tracebacks in knn, embed, export and pretrain --resume (found by an audit)."""
    import shutil

    path = _edited(run_dir, tmp_path, name, edit)
    for command in (["knn", "--checkpoint", str(path), "--data", str(demo_images)],
                    ["embed", str(path), "--data", str(demo_images), "--out", str(tmp_path / "emb")],
                    ["export", str(path), "--out", str(tmp_path / "exp")]):
        assert main(["-q", *command]) == 2, command
        line = one_error_line(capsys)
        assert line.startswith(f"fedmoco {command[0]}: error: {path}: ") and problem.split(": ", 1)[-1] in line, line
    resumed = tmp_path / name / "resume"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("checkpoint.pt"))
    shutil.copy(path, resumed / "checkpoint.pt")
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(resumed), "--resume", "--epochs", "3",
                 "--no-plots"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"fedmoco pretrain: error: {resumed / 'checkpoint.pt'}: "), line


def test_a_pretraining_refused_before_it_wrote_anything_leaves_no_out_folder(tmp_path, capsys, demo_images):
    """--data that does not exist left a new --out holding only .pretrain.lock (found by an audit);
    an --out that was there before is left as it was."""
    out = tmp_path / "run"
    assert main(["-q", "pretrain", "--data", str(tmp_path / "nope"), "--out", str(out), "--arch", "tiny"]) == 2
    assert "does not exist" in one_error_line(capsys) and not out.exists()
    out.mkdir()
    assert main(["-q", "pretrain", "--data", str(tmp_path / "nope"), "--out", str(out), "--arch", "tiny"]) == 2
    capsys.readouterr()
    assert out.is_dir()
