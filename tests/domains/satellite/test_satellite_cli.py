"""`fedmoco pretrain --domain satellite` end to end on generated rasters (tiny model, CPU)."""

from __future__ import annotations

import pytest

from fedmoco.checkpoint import load_checkpoint
from fedmoco.cli import main
from fedmoco.metrics import read_jsonl

TINY = ["--arch", "tiny", "--hidden-dim", "32", "--dim", "16", "--queue-size", "32", "--image-size", "32",
        "--batch-size", "8", "--workers", "0", "--epochs", "1", "--max-steps-per-epoch", "2", "--no-plots"]


@pytest.mark.parametrize("fixture,options,channels", [
    ("demo4", [], 4),
    ("demo13", [], 13),
    ("demo13", ["--data-option", "bands=B02,B03,B04,B08", "--data-option", "indices=ndvi"], 5),
])
def test_pretrain_trains_on_4_and_13_bands(request, tmp_path, fixture, options, channels, capsys):
    data = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    argv = ["-q", "pretrain", "--domain", "satellite", "--data", str(data), "--out", str(out), *TINY, *options]
    assert main(argv) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["moco_config"]["in_channels"] == channels
    assert len(ckpt["data"]["normalization"]["mean"]) == channels
    assert ckpt["data"]["domain"] == "satellite"
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "step" in r]
    assert len(steps) == 2 and all(r["loss"] == r["loss"] for r in steps)  # finite, not NaN
    assert "skipped:    4 files while scanning" in capsys.readouterr().out


def test_knn_reuses_the_checkpoint_normalization(tmp_path, labelled4, capsys):
    run = tmp_path / "run"
    assert main(["-q", "pretrain", "--domain", "satellite", "--data", str(labelled4), "--out", str(run), *TINY]) == 0
    assert main(["-q", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(labelled4), "--k", "5"]) == 0
    assert "knn: top-1" in capsys.readouterr().out


def test_bad_option_is_a_one_line_error(tmp_path, demo4, capsys):
    argv = ["-q", "pretrain", "--domain", "satellite", "--data", str(demo4), "--out", str(tmp_path / "r"), *TINY,
            "--data-option", "max_nodata=2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "fedmoco pretrain: error: satellite data option max_nodata=2: must be <= 1.0"
    )


def test_knn_counts_skipped_rasters_and_leaves_a_labels_csv_in_the_folder_alone(tmp_path, labelled4, capsys):
    import json
    import shutil

    data = tmp_path / "labelled"
    shutil.copytree(labelled4, data)
    (data / "water" / "broken.tif").write_text("not a raster")
    rows = ["path,label"] + [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.tif"))]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["-q", "pretrain", "--domain", "satellite", "--data", str(labelled4), "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["-q", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data),
                 "--labels", str(data / "labels.csv"), "--k", "5", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "knn.json").read_text())
    note = f"{data}: skipped 1 files: 1 not a raster; they are in no split (the log names them)"
    assert note in report["warnings"]  # the CSV itself is not scanned, so not counted
    assert f"warning: {note}" in capsys.readouterr().out


def test_a_band_count_mismatch_says_how_to_select_bands(tmp_path, demo4, labelled4, capsys):
    run = tmp_path / "run"
    assert main(["-q", "pretrain", "--domain", "satellite", "--data", str(demo4), "--out", str(run), *TINY,
                 "--data-option", "bands=1,2,3"]) == 0
    capsys.readouterr()
    assert main(["-q", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(labelled4),
                 "--data-option", "bands=1,2,3,4"]) == 2
    err = capsys.readouterr().err
    assert "normalization has 3 channels but the selected bands give 4 (blue, green, red, nir)" in err
    assert err.rstrip().endswith("select the encoder's bands with the data option bands (1-based indices or names, "
                                 "docs/satellite.md)")
