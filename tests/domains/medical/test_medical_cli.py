"""`fedmoco pretrain --domain medical` and kNN evaluation, run in-process as a user would."""

from __future__ import annotations

import json

from fedmoco.checkpoint import load_checkpoint
from fedmoco.cli import main


def test_pretrain_then_knn_on_dicom_folders(demo_archive, labelled_archive, tmp_path, cache_dir,
                                            tiny_pretrain_args, capsys):
    run = tmp_path / "run"
    rc = main(["-q", "pretrain", "--domain", "medical", "--data", str(demo_archive), "--out", str(run),
               *tiny_pretrain_args, "--data-option", f"cache_dir={cache_dir}", "--data-option", "slices=3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped:    4 files while scanning, 0 samples while loading" in out
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["moco_config"]["in_channels"] == 3 and ckpt["epoch"] == 2
    assert ckpt["data"]["domain"] == "medical" and ckpt["data"]["options"]["slices"] == 3
    assert ckpt["data"]["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert (run / "plots" / "loss.png").is_file()

    rc = main(["-q", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(labelled_archive),
               "--k", "5"])
    assert rc == 0
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["classes"] == ["abdomen", "chest", "head"] and 0 <= result["accuracy"] <= 1
    assert result["grouped_by"] == "patient"  # slices of one patient never straddle train and test
    assert result["n_train"] + result["n_test"] == 42  # 6 patients x (6 CT slices + 1 CR)


def test_bad_medical_option_is_one_line(demo_archive, tmp_path, tiny_pretrain_args, capsys):
    rc = main(["-q", "pretrain", "--domain", "medical", "--data", str(demo_archive), "--out",
               str(tmp_path / "run"), *tiny_pretrain_args, "--data-option", "crop_scale=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == "fedmoco pretrain: error: --data-option crop_scale=3.0: must be in (0, 1]"
