"""The fedmoco command as a user runs it: files written, resume, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from fedmoco.checkpoint import load_checkpoint
from fedmoco.cli import main
from fedmoco.metrics import read_jsonl
from fedmoco.train import Trainer


def test_pretrain_writes_checkpoint_metrics_and_plots(tmp_path, demo_images, tiny_pretrain_args, capsys):
    out = tmp_path / "run"
    # what an attempt stopped before its first checkpoint leaves: its steps, and a torn temp file
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 9.0}\n{"step": 1, "loss": 8.0}\n')
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"torn")
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args]) == 0
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["moco_config"]["arch"] == "tiny" and ckpt["moco_config"]["in_channels"] == 3
    assert {"optimizer", "scheduler", "scaler", "global_step"} <= set(ckpt["trainer"])
    assert len(ckpt["data"]["normalization"]["mean"]) == 3
    assert int(ckpt["model"]["queue.count"]) == 64  # 2 epochs x 3 steps x 16 keys, capped at K
    records = list(read_jsonl(out / "metrics.jsonl"))
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4, 5]  # the earlier attempt's steps are gone
    # each step logs the rate it trained with, read before the scheduler moved on: warm-up over
    # the first epoch's 3 steps from 1e-3 of 0.06 x 16 / 256, the full rate at step 3, and a
    # cosine that reaches 0 only after the last step
    assert steps[0]["lr"] == pytest.approx(0.06 * 16 / 256 * 1e-3)
    assert steps[3]["lr"] == pytest.approx(0.06 * 16 / 256) and steps[-1]["lr"] > 0
    assert {"loss", "pos_mean", "neg_mean", "neg_var", "emb_std"} <= set(steps[0])
    assert [r["epoch"] for r in records if r.get("event") == "epoch"] == [0, 1]
    for png in ("loss.png", "scores.png", "score_hist.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"checkpoint: {out / 'checkpoint.pt'}" in capsys.readouterr().out


def test_resume_continues_with_same_queue_and_matches_uninterrupted_run(tmp_path, demo_images,
                                                                        tiny_pretrain_args, monkeypatch):
    args = ["-q", "pretrain", "--data", str(demo_images), *tiny_pretrain_args]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0

    real_epoch = Trainer.train_epoch

    def crash_in_second_epoch(self, loader, *, epoch=0, **kw):
        if epoch == 1:
            raise KeyboardInterrupt("power cut")
        return real_epoch(self, loader, epoch=epoch, **kw)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_second_epoch)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130  # interrupted: 128 + SIGINT
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert saved["epoch"] == 1

    resumed_queues = []
    real_load = torch.nn.Module.load_state_dict
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)

    def spy_load(module, state, *a, **kw):
        res = real_load(module, state, *a, **kw)
        if hasattr(module, "queue"):
            resumed_queues.append(module.queue.buffer.clone())
        return res

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy_load)
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert torch.equal(resumed_queues[0], saved["model"]["queue.buffer"])  # not a fresh random queue

    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert cut["epoch"] == 2
    for key in full["model"]:
        assert torch.allclose(full["model"][key].float(), cut["model"][key].float(), atol=1e-5), key
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "step" in r]
    assert steps == list(range(6))  # no step logged twice


def test_knn_and_linear_probe_report_and_plot(tmp_path, demo_images, tiny_pretrain_args, capsys):
    out = tmp_path / "run"
    main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args])
    ck = str(out / "checkpoint.pt")
    assert main(["-q", "knn", "--checkpoint", ck, "--data", str(demo_images)]) == 0
    res = json.loads((out / "eval" / "knn.json").read_text())
    assert res["n_train"] + res["n_test"] == 48 and 0 <= res["accuracy"] <= 1 and "top5" not in res  # 4 classes
    assert res["k"] == round(res["n_train"] ** 0.5)  # k=200 >= training set: the sqrt rule, not a majority vote
    assert set(res["random_init"]) >= {"accuracy", "auroc", "n_test"}
    assert sum(map(sum, res["confusion"])) == res["n_test"]
    assert (out / "eval" / "knn_confusion.png").exists()
    assert main(["-q", "linear-probe", "--checkpoint", ck, "--data", str(demo_images), "--epochs", "5"]) == 0
    assert "linear-probe: top-1" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--queue-size", "0"], "--queue-size must be >= 1, got 0"),
    (["--momentum", "1.0"], "--momentum must be in [0, 1), got 1.0"),
    (["--temperature", "-1"], "--temperature must be > 0, got -1.0"),
    (["--seed", "-1"], "--seed must be a whole number in [0, 2**32), got -1"),
    (["--batch-size", "1"], "--batch-size must be >= 2, got 1"),  # a contrastive batch needs a negative
    # named by the flag the user typed, not the config field (dual_view_weight)
    (["--dual-view-weight", "2"], "--dual-view-weight must be in [0, 1], got 2.0"),
    (["--hard-negative-fraction", "0"], "--hard-negative-fraction must be in (0, 1], got 0.0"),
    (["--pos-extrapolation-alpha", "-1"], "--pos-extrapolation-alpha must be >= 0, got -1.0"),
    # one sub-batch is plain BN: every batch was skipped and an untrained encoder saved, exit 0
    (["--norm-splits", "1"], "--norm-splits must be >= 2 with norm split-batch, got 1"),
])
def test_nonsense_hyperparameters_give_one_line(tmp_path, demo_images, capsys, extra, message):
    rc = main(["-q", "pretrain", "--data", str(demo_images), "--out", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_a_folder_with_one_image_is_refused_not_saved_untrained(tmp_path, demo_images, capsys):
    """Every batch had fewer than 2 images, so no step ran; the run saved its random-init
    encoder as a checkpoint and exited 0 (found by an audit)."""
    one = tmp_path / "one" / "a"
    one.mkdir(parents=True)
    first = sorted((demo_images / "circle").glob("*.png"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    out = tmp_path / "r"
    rc = main(["-q", "pretrain", "--data", str(one.parent), "--out", str(out), "--arch", "tiny", "--epochs", "1",
               "--workers", "0", "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert (f"{one.parent}: epoch 1 had no batch of 2 or more readable images (1 samples, 0 unreadable): a MoCo "
            "step contrasts at least 2 images, so nothing was trained") in err
    assert not (out / "checkpoint.pt").exists()


def test_a_checkpoint_with_nan_weights_or_a_diverging_probe_is_one_line(tmp_path, demo_images, tiny_pretrain_args,
                                                                        capsys):
    """NaN weights gave knn and linear-probe a scikit-learn traceback ("Input contains NaN"), and
    finetune blamed its own --lr; a probe at --lr 1e37 did the same (found by an audit)."""
    out = tmp_path / "run"
    main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args])
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point() and k.startswith("encoder_q"))
    ck["model"][name] = torch.full_like(ck["model"][name], float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    capsys.readouterr()
    for command in ("knn", "linear-probe", "finetune"):
        rc = main(["-q", command, "--checkpoint", str(tmp_path / "nan.pt"), "--data", str(demo_images),
                   "--out", str(tmp_path / command)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (command, err)
        assert (f"{tmp_path / 'nan.pt'}: 1 weight tensor(s) hold NaN or inf values (first: {name}); the run that "
                "wrote it diverged or the file was damaged") in err
    rc = main(["-q", "linear-probe", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(demo_images),
               "--lr", "1e37", "--epochs", "3", "--out", str(tmp_path / "lp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert ("linear-probe: the classifier on the pretrained features diverged (NaN or inf outputs) at --lr 1e+37; "
            "lower --lr") in err


def test_a_folder_name_that_is_not_utf8_is_printed_not_a_traceback(tmp_path, demo_images):
    """check-site printed the folder's name to a strict UTF-8 stdout (any UTF-8 locale) and ended in
    UnicodeEncodeError (found by an audit). The name's own bytes are printed, as ls does."""
    import os
    import shutil

    name = os.fsdecode(b"dat\xe9")  # Latin-1 bytes: lone surrogates in Python
    shutil.copytree(demo_images / "circle", tmp_path / name / "circle")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    run = subprocess.run([sys.executable, "-m", "fedmoco.cli", "-q", "check-site", "--domain", "images", "--data",
                          os.fsencode(tmp_path / name), "--steps", "0"], capture_output=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    assert b"usable images:   12; 12 images under " + os.fsencode(tmp_path / name) in run.stdout


def test_data_folder_errors_name_the_path(tmp_path, capsys):
    assert main(["-q", "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert f"{tmp_path / 'nope'}: data folder does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["-q", "pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert f"{tmp_path / 'empty'}: data folder is empty" in capsys.readouterr().err


def test_checkpoint_of_other_architecture_or_channels(tmp_path, demo_images, tiny_pretrain_args, capsys):
    out = tmp_path / "run"
    main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args])
    capsys.readouterr()
    rc = main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), "--resume", "--epochs", "2",
               "--arch", "resnet18"])
    assert rc == 2 and "checkpoint is for another model: arch 'tiny' (checkpoint) vs 'resnet18'" in capsys.readouterr().err
    gray = tmp_path / "gray" / "a"
    gray.mkdir(parents=True)
    from PIL import Image
    for i, f in enumerate(sorted((demo_images / "circle").glob("*.png"))[:4]):
        Image.open(f).convert("L").save(gray / f"{i}.png")
    rc = main(["-q", "knn", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(gray.parent),
               "--data-option", "channels=1"])
    # the checkpoint's normalisation fixes 3 channels; forcing 1 is refused with the reason
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint" in err and "channel" in err


def test_a_resumed_run_refuses_another_temperature_momentum_or_preset(tmp_path, demo_images, tiny_pretrain_args,
                                                                       capsys):
    # a changed temperature or momentum was applied mid-run, and --moco v3 on a v2 run ignored, silently
    out = tmp_path / "run"
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args]) == 0
    base = ["-q", "pretrain", "--data", str(demo_images), "--out", str(out), "--resume", "--epochs", "2"]
    capsys.readouterr()
    assert main([*base, "--temperature", "0.1", "--momentum", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "conflicting: --momentum 0.5 (the run's: 0.999); " \
        "--temperature 0.1 (the run's: 0.2)" in err
    assert main([*base, "--moco", "v3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--moco v3 (predictor True, symmetric True, momentum 0.99, " \
        "momentum_schedule 'cosine'; the run's: predictor False, symmetric False, momentum 0.999, " \
        "momentum_schedule 'constant')" in err
    assert main([*base, "--moco", "v2", "--temperature", "0.2"]) == 0  # the run's own settings: no conflict


def test_errors_have_no_traceback_from_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmoco", "pretrain", "--data", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"fedmoco pretrain: error: {tmp_path / 'missing'}: data folder does not exist"
    assert "Traceback" not in proc.stderr


def test_knn_on_checkpoint_without_normalization_estimates_it(tmp_path, demo_images, tiny_pretrain_args, capsys):
    # A federated encoder carries no normalisation (each site normalised its own data).
    from fedmoco.checkpoint import atomic_save

    out = tmp_path / "run"
    main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["data"]["normalization"] = None
    atomic_save(ckpt, tmp_path / "federated.pt")
    assert main(["-q", "knn", "--checkpoint", str(tmp_path / "federated.pt"), "--data", str(demo_images),
                 "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "knn.json").read_text())["n_test"] > 0


def test_help_does_not_import_torch():
    # `fedmoco --help` (and a typo's usage line) should answer at once, not after torch's
    # seconds-long import: the parsers are built from modules that import torch lazily
    code = ("import sys, contextlib, io\nfrom fedmoco.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_test_set_is_normalised_with_the_statistics_of_data(tmp_path, demo_images, tiny_pretrain_args):
    # Without a normalisation in the checkpoint it is estimated on --data; --test must go
    # through that same pipeline (the one model.pt records), not through its own statistics.
    import argparse
    import shutil

    import numpy as np
    from PIL import Image

    from fedmoco.checkpoint import atomic_save
    from fedmoco.eval_cli import load_inputs

    out = tmp_path / "run"
    main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["data"]["normalization"] = None
    atomic_save(ckpt, tmp_path / "federated.pt")
    dark = tmp_path / "dark"
    shutil.copytree(demo_images, dark)
    for path in dark.rglob("*.png"):  # a darker scanner: other statistics
        Image.fromarray((np.asarray(Image.open(path)) // 4).astype(np.uint8)).save(path)
    args = argparse.Namespace(checkpoint=tmp_path / "federated.pt", domain=None, data_option=[], seed=0,
                              split_seed=0, label_column=None, data=demo_images, labels=None, test=dark,
                              test_labels=None)
    inputs = load_inputs(args)
    assert inputs.test.normalization == inputs.data.normalization
    assert inputs.data_meta["normalization"] == inputs.data.normalization.to_dict()


def test_a_resumed_run_keeps_this_invocations_cache_and_progress_settings():
    from pathlib import Path

    from fedmoco.config import TrainConfig
    from fedmoco.data import DataConfig
    from fedmoco.pretrain import resumed_settings

    saved = {"data": {"domain": "satellite", "image_size": 32, "options": {"bands": "1,2"}},
             "train_config": TrainConfig(epochs=2).to_dict(), "epoch": 1}
    asked = DataConfig(image_size=32, options={"tile_size": 64}, cache=False, cache_dir="/elsewhere", progress=False)
    _, _, data = resumed_settings(saved, Path("run/checkpoint.pt"), "satellite", TrainConfig(epochs=2), asked,
                                  frozenset())
    assert (data.cache, data.cache_dir, data.progress) == (False, "/elsewhere", False)  # --no-cache, -q
    # --batch-augment is how this machine makes the views: it follows the invocation too
    train, _ = resumed_settings(saved, Path("run/checkpoint.pt"), "satellite", TrainConfig(epochs=2, batch_augment="off"),
                                asked, frozenset())[1:]
    assert train.batch_augment == "off"
    assert data.options == {"bands": "1,2", "tile_size": 64} and data.image_size == 32


def test_the_resume_hint_keeps_an_extension_and_the_runtime_options(tmp_path, demo_images, tiny_pretrain_args):
    import argparse

    from fedmoco.cli import _checkpoint_hint

    out = tmp_path / "run"
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args]) == 0
    args = argparse.Namespace(out=out, data=demo_images, workers=0, device="cpu", epochs=5)  # extending 2 -> 5
    assert _checkpoint_hint(args) == (f"{out / 'checkpoint.pt'} holds epoch 2 of 5; resume with: fedmoco pretrain "
                                      f"--data {demo_images} --out {out} --workers 0 --device cpu --epochs 5 --resume")
    # --batch-augment off and --no-cache change the views: a resume without them was another run
    args = argparse.Namespace(out=out, data=demo_images, workers=0, device="cpu", epochs=None,
                              batch_augment="off", no_cache=True, no_amp=True, no_plots=False)
    assert _checkpoint_hint(args) == (f"{out / 'checkpoint.pt'} holds epoch 2 of 2; resume with: fedmoco pretrain "
                                      f"--data {demo_images} --out {out} --workers 0 --device cpu --batch-augment "
                                      "off --no-cache --no-amp --resume")


def test_resume_of_a_run_stopped_in_its_first_epoch_says_to_start_it_again(tmp_path, demo_images, capsys):
    """Killed in epoch 1, a run leaves --out with no checkpoint; --resume said only "checkpoint
    does not exist" (found by an audit)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (f"fedmoco pretrain: error: {out / 'checkpoint.pt'}: no epoch of the run in "
                                       f"{out} has finished, so there is nothing to resume; run the same command "
                                       "without --resume\n")


def test_a_second_pretrain_into_a_busy_out_is_refused(tmp_path, demo_images, tiny_pretrain_args, capsys):
    """Two runs started together into one --out both passed the "checkpoint exists" check and
    interleaved their metrics and checkpoints; the second is refused while the first holds --out."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".pretrain.lock", "a+") as held:  # as a running pretrain holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args]) == 2
    assert capsys.readouterr().err == (f"fedmoco pretrain: error: {out}: another fedmoco pretrain is writing there; "
                                       "wait for it, or choose another --out\n")
    assert not (out / "checkpoint.pt").exists()
    assert main(["-q", "pretrain", "--data", str(demo_images), "--out", str(out), *tiny_pretrain_args]) == 0


def test_a_failed_pretrain_call_releases_its_lock_even_while_its_traceback_is_kept(tmp_path, demo_images):
    """The lock was a local of the failed call's frame: a kept traceback (a notebook's, or
    pytest.raises here) held it, and every later call into that --out was refused as busy."""
    from fedmoco.config import TrainConfig
    from fedmoco.data import DataConfig
    from fedmoco.errors import CheckpointError
    from fedmoco.pretrain import pretrain

    kwargs = dict(moco_overrides={"arch": "tiny"}, train_cfg=TrainConfig(epochs=1, batch_size=8),
                  data_cfg=DataConfig(image_size=16), device=torch.device("cpu"), progress=False)
    with pytest.raises(CheckpointError) as kept:  # nothing to resume
        pretrain("images", demo_images, tmp_path / "run", resume=True, **kwargs)
    assert kept.value.__traceback__ is not None
    assert pretrain("images", demo_images, tmp_path / "run", **kwargs).epochs_done == 1


def test_log_lines_go_to_the_stderr_of_the_moment(capsys):
    """main() run in-process (an example, a notebook) must not bind logging to a stream its
    caller later replaces and closes: later records go to sys.stderr as it is then."""
    import contextlib
    import io
    import logging

    first = io.StringIO()
    with contextlib.redirect_stderr(first), contextlib.redirect_stdout(io.StringIO()):
        assert main(["cache"]) == 0
    first.close()
    second = io.StringIO()
    with contextlib.redirect_stderr(second):
        logging.getLogger("fedmoco.test").warning("after the first call")
    assert second.getvalue() == "WARNING fedmoco.test: after the first call\n"


def test_a_resumed_run_keeps_its_normalisation_when_the_data_changed(tmp_path, demo_images, tiny_pretrain_args,
                                                                     capsys):
    # estimated again from a folder that had changed, a resumed run's inputs moved mid-run
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    out = tmp_path / "run"
    args = ["-q", "pretrain", "--data", str(data), "--out", str(out), *tiny_pretrain_args]
    assert main([*args[:-2], "--epochs", "1"]) == 0
    first = torch.load(out / "checkpoint.pt", weights_only=True)["data"]
    for i in range(20):  # white images: the folder's mean moves a long way
        Image.new("RGB", (32, 32), (255, 255, 255)).save(data / "circle" / f"white_{i}.png")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["data"]
    assert resumed["normalization"] == first["normalization"]
    assert resumed["samples"] == first["samples"] + 20
    assert (f"{data} now gives {first['samples'] + 20} samples, {first['samples']} when the run began: the run "
            "goes on with the data as it is now and its own normalisation") in capsys.readouterr().err
