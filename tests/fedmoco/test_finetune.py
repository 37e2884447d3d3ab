"""fedmoco finetune end to end on generated images, and the one-line errors of bad labelled input."""

import csv
import json

import numpy as np
import pytest
import torch

from fedmoco.checkpoint import atomic_save
from fedmoco.cli import main
from fedmoco.config import MoCoConfig
from fedmoco.moco import MoCo
from fedmoco.pretrain import make_checkpoint

FAST = ["--epochs", "2", "--batch-size", "8", "--bootstrap", "20", "--workers", "0", "--device", "cpu"]


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny images-domain checkpoint (random weights stand in for a pretrained encoder)."""
    torch.manual_seed(0)  # the seed the random-init baseline must not reproduce
    model = MoCo(MoCoConfig.preset("v2", arch="tiny", dim=16, hidden_dim=32, queue_size=64, small_input=True,
                                   in_channels=3))
    data = {"domain": "images", "image_size": 32, "options": {},
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    return atomic_save(make_checkpoint(model, data=data), tmp_path / "ckpt" / "checkpoint.pt")


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _partial_labels(demo_images, path, n=36, multi=False, group_size=2):
    """Labels for ``n`` of the 48 demo images (all classes), ``group_size`` images of a class per group."""
    files = sorted(demo_images.rglob("*.png"))
    files = [f for i, f in enumerate(files) if n == len(files) or i % 4 != 3][:n]
    rows = []
    for i, f in enumerate(files):
        rel, cls = f.relative_to(demo_images).as_posix(), f.parent.name
        group = f"patient-{cls}-{i // group_size}"
        rows.append([rel, group, int(cls in ("circle", "square")), int(cls == "stripes")] if multi
                    else [rel, group, cls])
    header = ["path", "group", "round_or_square", "striped"] if multi else ["path", "group", "label"]
    return _write_csv(path, header, rows)


def test_finetune_writes_results_with_curve_and_baseline(tmp_path, demo_images, checkpoint, capsys):
    # covers 36 of 48 images, one a group: the test split's 11 groups are enough for a bootstrap
    labels = _partial_labels(demo_images, tmp_path / "labels.csv", group_size=1)
    out = tmp_path / "ft"
    rc = main(["-q", "finetune", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--labels", str(labels),
               "--out", str(out), "--label-fraction", "0.5", "1.0", "--seeds", "0", "1", *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "auroc", "sensitivity", "specificity", "n_test"):
        assert key in res and key in res["random_init"]
        assert key == "n_test" or 0 <= res[key] <= 1
    split = res["split"]
    assert split["n_pool"] + split["n_val"] + split["n_test"] == 36  # only labelled rows are used
    assert res["n_test"] == split["n_test"] and split["grouped_by"] == "csv group column"
    assert set(res["label_fractions"]) == {"0.5", "1"}
    point = res["label_fractions"]["0.5"]["pretrained"]
    assert set(point["seeds"]) == {"0", "1"} and set(point["mean"]) >= {"auroc", "accuracy"}
    assert point["seeds"]["0"]["n_train"] < res["label_fractions"]["1"]["pretrained"]["seeds"]["0"]["n_train"]
    assert res["classes"] == ["circle", "square", "stripes", "triangle"] and "top5" not in res
    assert len(res["ci95"]["auroc"]) == 2
    # the gain over random init, with its paired interval, from the same draws as both CIs
    gain = res["gain"]
    assert gain["auroc"] == pytest.approx(res["auroc"] - res["random_init"]["auroc"])
    lo, hi = gain["ci95"]["auroc"]
    assert lo <= hi and 0 <= gain["p_no_gain"]["auroc"] <= 1 and gain["bootstrap"]["paired"] is True
    assert res["label_fractions"]["1"]["gain"]["ci95"] == gain["ci95"]
    pre, rnd = res["label_fractions"]["1"]["pretrained"]["seeds"], res["label_fractions"]["1"]["random_init"]["seeds"]
    assert {s: g["auroc"] for s, g in gain["per_seed"].items()} == pytest.approx(
        {s: pre[s]["auroc"] - rnd[s]["auroc"] for s in ("0", "1")})
    for png in ("roc.png", "confusion.png", "roc_random_init.png", "confusion_random_init.png",
                "label_efficiency.png"):
        assert (out / png).stat().st_size > 1000
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["classes"] == res["classes"] and saved["head"]["weight"].shape == (4, 128)
    from fedmoco.finetune import fresh_backbone
    ck = torch.load(checkpoint, weights_only=True)
    first = "encoder_q.backbone.features.0.weight"
    assert not torch.equal(fresh_backbone(ck["moco_config"], 0).state_dict()["features.0.weight"], ck["model"][first])
    assert res["warnings"] == [] or all("split lacks" in w for w in res["warnings"])
    text = (out / "results.json").read_text()
    assert "patient-" not in text  # group keys are never written out
    printed = capsys.readouterr().out
    assert "finetune pretrained : auroc" in printed and f"finetune gain       : auroc {gain['auroc']:+.3f}" in printed


def test_a_test_set_of_few_patients_gets_no_interval_and_says_why(tmp_path, demo_images, checkpoint, capsys):
    """All test images from one patient: the paired 'CI' was [+0.177, +0.177] and p_no_gain
    0.000 with no warning, a certain gain from one patient (found by an audit)."""
    labels = _partial_labels(demo_images, tmp_path / "labels.csv")
    test_dir = tmp_path / "test"
    rows = []
    for f in sorted(demo_images.rglob("*.png"))[::6]:  # 8 images, 2 of each class
        (test_dir / f.parent.name).mkdir(parents=True, exist_ok=True)
        (test_dir / f.parent.name / f.name).write_bytes(f.read_bytes())
        rows.append([f"{f.parent.name}/{f.name}", "one-patient", f.parent.name])
    test_labels = _write_csv(tmp_path / "test.csv", ["path", "group", "label"], rows)
    out = tmp_path / "ft"
    rc = main(["-q", "finetune", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--labels", str(labels),
               "--test", str(test_dir), "--test-labels", str(test_labels), "--out", str(out), *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["gain"]["ci95"]["auroc"] == [None, None] and res["gain"]["p_no_gain"]["auroc"] is None
    assert res["ci95"]["auroc"] == [None, None]
    assert ("test set: 1 group(s); a bootstrap interval needs at least 10 (resampling so few redraws the same "
            "patients), so ci95 and p_no_gain are left empty") in res["warnings"]
    printed = capsys.readouterr().out
    assert "finetune gain       : auroc" in printed and "share of draws" not in printed and "[" not in printed


def test_finetune_multilabel_and_federated_checkpoint_without_normalization(tmp_path, demo_images, checkpoint,
                                                                            monkeypatch):
    monkeypatch.setattr("fedmoco.finetune.MAX_CACHE_BYTES", 0)  # the streaming path, as for a large set
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["data"]["normalization"] = None  # as a federation's encoder.pt without input-mean/std
    atomic_save(ckpt, tmp_path / "encoder.pt")
    labels = _partial_labels(demo_images, tmp_path / "ml.csv", n=48, multi=True)
    out = tmp_path / "ml"
    assert main(["-q", "finetune", "--checkpoint", str(tmp_path / "encoder.pt"), "--data", str(demo_images),
                 "--labels", str(labels), "--out", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["multi_label"] and res["classes"] == ["round_or_square", "striped"]
    assert len(res["per_class_auroc"]) == 2 and "subset_accuracy" in res["label_fractions"]["1"]["pretrained"]["mean"]


def _copy(src, dest):
    dest.write_bytes(src.read_bytes())
    return dest


def _write_text(path, text):
    path.write_text(text)
    return path


def err_of_quote(tmp_path, base, capsys):
    return _run([*base, "--labels", str(tmp_path / "quote.csv"), "--out", str(tmp_path / "quote2")], capsys)[1]


def _run(args, capsys):
    rc = main(["-q", *args])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("command", ["finetune", "knn"])
def test_bad_labelled_input_gives_one_line(tmp_path, demo_images, checkpoint, capsys, command):
    base = [command, "--checkpoint", str(checkpoint), "--data", str(demo_images), *(FAST if command == "finetune" else [])]
    files = sorted(demo_images.rglob("*.png"))
    rel = [f.relative_to(demo_images).as_posix() for f in files]
    cases = {
        "one class": (_write_csv(tmp_path / "one.csv", ["path", "label"], [[r, "circle"] for r in rel[:10]]),
                      "only one class ('circle') among the labelled samples"),
        "unknown path": (_write_csv(tmp_path / "unknown.csv", ["path", "label"],
                                    [[r, "a"] for r in rel[:5]] + [["circle/nope.png", "b"]]),
                         "1 row(s) name files that do not exist under"),
        # a valid image outside --data was left out as "not a usable sample"
        "outside": (_write_csv(tmp_path / "outside.csv", ["path", "label"],
                               [[r, f.parent.name] for r, f in zip(rel, files)]
                               + [[str(_copy(files[0], tmp_path / "elsewhere.png")), "circle"]]),
                    f"1 row(s) name files outside {demo_images} (first: '{tmp_path / 'elsewhere.png'}'); the "
                    "labelled files must be under --data"),
        # an unclosed quote swallows the rest of the file into one cell, which the line once printed whole
        "quote": (_write_text(tmp_path / "quote.csv", "path,label\n\"circle/x.png,a\n"
                              + "".join(f"{r},b\n" for r in rel)),
                  "(first: 'circle/x.png,a\\n"),
        "one group": (_write_csv(tmp_path / "group.csv", ["path", "group", "label"],
                                 [[r, "same-patient", f.parent.name] for r, f in zip(rel, files)]),
                      "belong to one group"),
    }
    for name, (csv_path, message) in cases.items():
        rc, err = _run([*base, "--labels", str(csv_path), "--out", str(tmp_path / name)], capsys)
        assert rc == 2 and message in err and err.count("\n") == 1, (name, err)
        assert len(err) < 600, (name, err)
    assert err_of_quote(tmp_path, base, capsys).endswith("…', which spans lines: an unclosed quote (\") in the CSV?)\n")
    # a separate --test holding the training files
    rc, err = _run([*base, "--test", str(demo_images), "--out", str(tmp_path / "leak")], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "48 key(s) of the test set's groups (file; each CSV group, patient/scene and file counts) also occur in" in err
    # a class folder holding sub-folders: --data points at the wrong level
    nested = tmp_path / "nested" / "circle" / "patient1"
    nested.mkdir(parents=True)
    (nested / "a.png").write_bytes(files[0].read_bytes())
    (tmp_path / "nested" / "square").mkdir()
    (tmp_path / "nested" / "square" / "b.png").write_bytes(files[-1].read_bytes())
    rc, err = _run([command, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nested")], capsys)
    assert rc == 2 and "circle: class folder holds sub-folders (patient1/)" in err and err.count("\n") == 1


def test_knn_refuses_multilabel_and_empty_train(tmp_path, demo_images, checkpoint, capsys):
    labels = _partial_labels(demo_images, tmp_path / "ml.csv", n=48, multi=True)
    rc, err = _run(["knn", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--labels", str(labels)], capsys)
    assert rc == 2 and "takes one label column; use fedmoco finetune for multi-label" in err


def test_only_labelled_rows_and_patient_groups_from_dicom(tmp_path):
    """The DICOM patient is read for grouping only, hashed at once; frames of one patient share a group."""
    from domains.medical import make_demo_archive
    from fedmoco.data import DataConfig
    from fedmoco.labels import build_labelled_set, load_label_table

    root = make_demo_archive(tmp_path / "hospital", n_patients=4, seed=1, image_size=32, n_slices=2, labelled=True)
    files = sorted(p for p in root.rglob("*.dcm") if "unsorted" not in p.parts)
    labelled = [p for p in files if p.parent.name == "ct"]  # only the CT slices are labelled
    csv_path = _write_csv(tmp_path / "labels.csv", ["path", "label"],
                          [[p.relative_to(root).as_posix(), p.parts[-4]] for p in labelled])
    table = load_label_table(root, csv_path, "medical")
    cfg = DataConfig(image_size=32, options={"cache": False})
    data = build_labelled_set("medical", root, table, cfg, None)
    assert data.group_source == "patient"
    assert len(data.targets) == len(labelled)  # CR files (unlabelled) are left out
    patient_dir = [table.paths[r].parts[-3] for r in data.rows]
    for g in set(data.groups.tolist()):
        assert len({p for p, gg in zip(patient_dir, data.groups) if gg == g}) == 1  # one group = one patient
    assert len(set(data.groups.tolist())) == len(set(patient_dir))
    assert not any("DEMO-" in g for g in data.groups)  # hashed, never the PatientID itself


def test_linear_probe_saves_its_classifier(tmp_path, demo_images, checkpoint, capsys):
    out = tmp_path / "probe"
    assert main(["-q", "linear-probe", "--checkpoint", str(checkpoint), "--data", str(demo_images),
                 "--epochs", "3", "--out", str(out)]) == 0
    saved = torch.load(out / "linear-probe.pt", weights_only=True)
    assert saved["classes"] == ["circle", "square", "stripes", "triangle"]
    assert saved["state_dict"]["1.weight"].shape == (4, 128)  # standardise, then linear
    res = json.loads((out / "linear-probe.json").read_text())
    assert res["grouped_by"] == "file" and "auroc" in res and "auroc" in res["random_init"]
    assert "classifier:" in capsys.readouterr().out


def test_a_csv_row_may_label_a_whole_folder(tmp_path):
    """One row per patient folder (a study, a series) labels every file under it."""
    from domains.medical import make_demo_archive
    from fedmoco.labels import read_label_table

    root = make_demo_archive(tmp_path / "hospital", n_patients=3, seed=2, image_size=32, n_slices=2, labelled=True)
    patients = sorted(p for p in root.glob("*/patient_*") if p.is_dir())
    csv_path = _write_csv(tmp_path / "studies.csv", ["path", "label"],
                          [[p.relative_to(root).as_posix(), p.parent.name] for p in patients])
    table = read_label_table(root, csv_path)
    files = sorted(f.resolve() for p in patients for f in p.rglob("*") if f.is_file())
    assert sorted(table.paths) == files
    assert [table.names[t] for t in table.targets] == [p.relative_to(root.resolve()).parts[0] for p in table.paths]


def test_default_positive_class_is_the_finding():
    from fedmoco.eval_cli import default_positive

    assert default_positive(["nodule", "normal"]) == 0  # sorted order would pick "normal"
    assert default_positive(["Healthy", "pneumonia"]) == 1
    assert default_positive(["crop", "water"]) == 1  # no "no finding" name: the second class


def test_satellite_scene_groups_keep_acquisitions_of_one_footprint_together(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    from domains.satellite import group_keys

    def write(name, origin, crs="EPSG:32633", pixel=10):
        profile = {"driver": "GTiff", "width": 16, "height": 16, "count": 4, "dtype": "uint16",
                   "crs": crs, "transform": from_origin(*origin, pixel, pixel)}
        with rasterio.open(tmp_path / name, "w", **profile) as dst:
            dst.write(np.full((4, 16, 16), 1000, np.uint16))
        return tmp_path / name

    spring, autumn = write("t1_2023-04.tif", (500000, 4600000)), write("t1_2023-10.tif", (500000, 4600000))
    other = write("t2_2023-04.tif", (600000, 4600000))
    keys = group_keys([spring, autumn, other], b"s" * 16)
    assert keys[0] == keys[1] != keys[2]
    assert group_keys([spring], b"t" * 16) != keys[:1]  # salted: not comparable across runs
    assert group_keys([tmp_path / "missing.tif"], b"s" * 16) == [None]
    # degrees: patches 0.0016 deg (16 pixels of 1e-4 deg, about 170 m) apart are other footprints
    geo = [write(f"geo_{i}.tif", (12.0 + 0.0016 * i, 45.0), crs="EPSG:4326", pixel=1e-4) for i in range(3)]
    again = write("geo_0_2023-10.tif", (12.0, 45.0), crs="EPSG:4326", pixel=1e-4)
    keys = group_keys([*geo, again], b"s" * 16)
    assert len(set(keys[:3])) == 3 and keys[3] == keys[0]


def test_label_efficiency_plot_marks_the_fractions_run_and_hides_no_series(tmp_path, monkeypatch):
    from fedmoco import plots
    from fedmoco.finetune import plot_label_efficiency

    axes = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: axes.append(fig.axes[0]) or real(fig, path))
    same = {"mean": {"auroc": 0.9}, "std": {"auroc": 0.02}}
    runs = {"0.1": {"pretrained": {"mean": {"auroc": 0.8}, "std": {"auroc": 0.03}}, "random_init": same},
            "1": {"pretrained": same, "random_init": same}}  # equal results at 100%
    path = plot_label_efficiency(runs, tmp_path / "le.png", n_test=50)
    assert path.stat().st_size > 1000
    ax = axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "100"]  # no "1000 %" decade
    lo, hi = ax.get_xlim()
    assert lo > 1 and hi < 200
    xs = [tuple(c.lines[0].get_xdata()) for c in ax.containers
          if c.get_label() in ("pretrained encoder", "random init")]
    assert len(xs) == 2 and xs[0] != xs[1]  # the equal points at 100% sit side by side, not on top


def test_repeated_seeds_and_a_diverged_fine_tune_give_one_line(tmp_path, demo_images, checkpoint, capsys):
    base = ["finetune", "--checkpoint", str(checkpoint), "--data", str(demo_images), *FAST]
    # a repeated seed would count twice in the bootstrap and once in the means
    rc, err = _run([*base, "--seeds", "0", "0", "1", "--out", str(tmp_path / "dup")], capsys)
    assert rc == 2 and err == ("fedmoco finetune: error: --seeds: 0 given more than once; each seed is one "
                               "fine-tuning run\n")
    rc, err = _run([*base, "--lr", "1e30", "--out", str(tmp_path / "nan")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "lower --lr" in err and "Traceback" not in err, err
    assert not (tmp_path / "nan" / "results.json").exists()
    # out-of-range seeds and a batch of one (every batch skipped: an untrained head reported as fine-tuned)
    rc, err = _run([*base, "--seeds", "-1", "--out", str(tmp_path / "neg")], capsys)
    assert rc == 2 and err == "fedmoco finetune: error: --seeds must be whole numbers in [0, 2**32), got -1\n"
    rc, err = _run([*base, "--batch-size", "1", "--out", str(tmp_path / "one")], capsys)
    assert rc == 2 and err == "fedmoco finetune: error: --batch-size must be >= 2, got 1\n"


def test_knn_says_when_its_training_split_lacks_a_class_and_writes_strict_json(tmp_path, demo_images, checkpoint,
                                                                              capsys):
    # every triangle in one group, which the split puts on one side only: no training triangle
    files = sorted(demo_images.rglob("*.png"))
    rows = [[f.relative_to(demo_images).as_posix(), "tri" if f.parent.name == "triangle" else f.name,
             f.parent.name, "x"] for f in files]
    # an extra metadata column, picked out with --label-column; saved as Excel's "CSV UTF-8" (with a BOM)
    csv_path = _write_csv(tmp_path / "grp.csv", ["path", "group", "label", "site"], rows)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    for seed in range(20):
        out = tmp_path / f"knn{seed}"
        rc = main(["-q", "knn", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--labels", str(csv_path),
                   "--label-column", "label", "--seed", str(seed), "--out", str(out)])
        printed = capsys.readouterr().out
        assert rc == 0
        report = json.loads((out / "knn.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
        if report["warnings"]:
            break
    assert report["warnings"] == [
        "the training split lacks class(es) ['triangle']: too few groups (patients, scenes, files) of them to put "
        "some in every split; their metrics are undefined or meaningless"]
    assert f"warning: {report['warnings'][0]}" in printed


def test_test_labels_go_with_a_test_folder(tmp_path, demo_images, checkpoint, capsys):
    labels = _partial_labels(demo_images, tmp_path / "labels.csv")
    rc, err = _run(["knn", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--test-labels", str(labels)],
                   capsys)
    assert rc == 2 and err == (f"fedmoco knn: error: --test-labels {labels}: labels for a test folder, but no --test "
                               "was given\n")
    # --labels for --data but a --test folder without --test-labels: its sub-folders became classes
    test = tmp_path / "patients"
    for i, f in enumerate(sorted(demo_images.rglob("*.png"))[:12]):
        (test / f"patient_{i}").mkdir(parents=True)
        (test / f"patient_{i}" / f.name).write_bytes(f.read_bytes())
    rc, err = _run(["knn", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--labels", str(labels),
                    "--test", str(test)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "12 class(es) ['patient_0', 'patient_1'," in err
    assert err.rstrip().endswith("--data is labelled by --labels but --test by its sub-folders: give --test-labels")


def test_a_test_set_may_lack_a_class_but_not_bring_a_new_one(tmp_path, demo_images, checkpoint, capsys):
    test = tmp_path / "test"
    for f in sorted(demo_images.rglob("*.png")):
        if f.parent.name != "stripes":  # the test set has no stripes
            (test / f.parent.name).mkdir(parents=True, exist_ok=True)
            (test / f.parent.name / f"t_{f.name}").write_bytes(f.read_bytes())
    (test / "labels.csv").write_text("kept in the folder: not an image, never a sample\n")
    rc, _ = _run(["knn", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--test", str(test),
                  "--out", str(tmp_path / "eval")], capsys)
    assert rc == 0
    report = json.loads((tmp_path / "eval" / "knn.json").read_text())
    assert report["classes"] == ["circle", "square", "stripes", "triangle"]
    confusion = np.asarray(report["confusion"])
    assert confusion.sum() == 36 and confusion[2].sum() == 0  # no true stripes; numbered as in --data
    (test / "cloud").mkdir()
    (test / "cloud" / "c.png").write_bytes(next(demo_images.rglob("*.png")).read_bytes())
    rc, err = _run(["knn", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--test", str(test),
                    "--out", str(tmp_path / "eval2")], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"{test} (class folders): 1 class(es) ['cloud'] are not among {demo_images}'s classes" in err


def test_label_csv_errors_name_what_is_wrong(tmp_path, demo_images):
    from fedmoco.errors import DataError
    from fedmoco.labels import read_label_table

    root = tmp_path / "data"
    for site in ("a", "b"):
        (root / site).mkdir(parents=True)
        (root / site / "patch_00.png").write_bytes((demo_images / "circle").glob("*.png").__next__().read_bytes())
    cases = {
        "ambiguous.csv": ("path,label\npatch_00,water\n",
                          "'patch_00' is the name of 2 files; give its path relative to"),
        "twice.csv": ("path,label\na/patch_00.png,water\na/patch_00.png,urban\n",
                      f"1 file(s) are listed more than once (first: {(root / 'a' / 'patch_00.png').resolve()})"),
        "windows.csv": ("path,window,label\na/patch_00.png,0-64,water\n",
                        "(labels are per file: several label columns mean multi-label; with one label per file, "
                        "name its column with --label-column (one of window, label), and put patients or sites in a "
                        "column named 'group')"),
        # the group column by any case or spacing; a label cut at an unquoted comma (found by an audit)
        "spaced.csv": ("path, label, Group\na/patch_00.png,water,g1\na/patch_01.png,urban,x,y\n",
                       "line 3 has 4 cells, the header 3 (an unquoted comma in a label or path? quote the cell)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as err:
            read_label_table(root, tmp_path / name)
        assert message in str(err.value), (name, str(err.value))


def test_a_finetune_stopped_after_its_results_leaves_no_earlier_model_beside_them(tmp_path, demo_images, checkpoint,
                                                                                   capsys, monkeypatch):
    import fedmoco.finetune as ft

    out = tmp_path / "ft"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier run's classifier")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_finetuned", stopped)
    rc = main(["-q", "finetune", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--out", str(out),
               "--seeds", "0", *FAST])
    assert rc == 130
    assert (out / "results.json").exists() and not (out / "model.pt").exists()


def test_unreadable_labelled_files_say_where_to_look_and_what_to_try(tmp_path, checkpoint, capsys):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            (data / cls / f"{i}.png").write_bytes(b"not a png")
    rc, err = _run(["knn", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and err.count("fedmoco knn: error:") == 1 and "Traceback" not in err  # after the warnings
    assert err.count("unreadable image") == 6
    assert "none of the first 6 labelled samples could be read (the warnings above name each file and why)" in err
    assert err.rstrip().endswith("give --domain")


def test_data_of_another_kind_than_the_checkpoints_says_which_domain_it_was_read_as(tmp_path, demo_images, capsys):
    torch.manual_seed(0)
    model = MoCo(MoCoConfig.preset("v2", arch="tiny", dim=16, hidden_dim=32, queue_size=64, small_input=True,
                                   in_channels=1))
    data = {"domain": "medical", "image_size": 32, "options": {}, "normalization": {"mean": [0.5], "std": [0.25]}}
    ckpt = atomic_save(make_checkpoint(model, data=data), tmp_path / "ckpt" / "checkpoint.pt")
    rc, err = _run(["knn", "--checkpoint", str(ckpt), "--data", str(demo_images), "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{demo_images}: no usable DICOM image among 48 files" in err
    assert err.rstrip().endswith("(read as medical data, the checkpoint's domain; --domain reads it as another)")


def test_band_files_of_a_labelled_product_are_not_called_unusable(tmp_path, caplog):
    """Class folders label every band file; the product reads them all and one speaks for its
    label. The others were counted as "labelled files not usable", though every one was read.
    A file that gives no sample is still counted."""
    import logging

    from domains.satellite.demo import from_origin, write_raster
    from fedmoco.data import DataConfig
    from fedmoco.labels import build_labelled_set, load_label_table

    for cls, scene, value in (("crop", "SCN1", 1000), ("water", "SCN2", 3000)):
        for band in ("B02", "B03", "B04"):
            write_raster(tmp_path / cls / scene / f"{scene}_{band}.tif", np.full((1, 32, 32), value, np.uint16),
                         transform=from_origin(500000, 4000000, 10, 10))
    table = load_label_table(tmp_path, None, "satellite")
    cfg = DataConfig(image_size=16, options={"cache": False})
    with caplog.at_level(logging.WARNING, logger="fedmoco.labels"):
        data = build_labelled_set("satellite", tmp_path, table, cfg, None)
    assert data.names == ["crop", "water"] and len(set(data.rows.tolist())) == 2
    assert "not usable" not in caplog.text
    (tmp_path / "water" / "notes.tif").write_bytes(b"not a raster")
    table = load_label_table(tmp_path, None, "satellite")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmoco.labels"):
        build_labelled_set("satellite", tmp_path, table, cfg, None)
    assert "1 labelled file(s) are not usable satellite samples" in caplog.text


def test_rows_without_a_csv_group_fall_back_to_the_patient_not_the_file(tmp_path):
    """The group is decided row by row: a CSV group column filled for some rows only used to
    send every other row to a group of its own file, so one patient's slices split both ways."""
    from domains.medical import make_demo_archive
    from fedmoco.data import DataConfig
    from fedmoco.labels import build_labelled_set, load_label_table

    root = make_demo_archive(tmp_path / "hospital", n_patients=4, seed=1, image_size=32, n_slices=2, labelled=True)
    files = sorted(p for p in root.rglob("*.dcm") if "unsorted" not in p.parts and p.parent.name == "ct")
    patient = {p: p.parts[-3] for p in files}
    first = patient[files[0]]
    rows = [[p.relative_to(root).as_posix(), p.parts[-4], "cohort-a" if patient[p] == first else ""] for p in files]
    table = load_label_table(root, _write_csv(tmp_path / "labels.csv", ["path", "label", "group"], rows), "medical")
    data = build_labelled_set("medical", root, table, DataConfig(image_size=32, options={"cache": False}), None)
    by_patient: dict[str, set] = {}
    for r, g in zip(data.rows, data.groups):
        by_patient.setdefault(patient[table.paths[r]], set()).add(g)
    assert all(len(g) == 1 for g in by_patient.values())  # every patient's slices in one group
    assert len(set(data.groups.tolist())) == len(by_patient)  # one group per patient, not per file
    assert data.group_source == "csv group column + patient"


def _ct_slices(tmp_path, n_slices):
    from domains.medical import make_demo_archive

    root = make_demo_archive(tmp_path / "hospital", n_patients=4, seed=1, image_size=32, n_slices=n_slices,
                             labelled=True)
    files = sorted(p for p in root.rglob("*.dcm") if "unsorted" not in p.parts and p.parent.name == "ct")
    return root, files, {p: p.parts[-3] for p in files}


def _groups_by_patient(tmp_path, root, patient, rows):
    from fedmoco.data import DataConfig
    from fedmoco.labels import build_labelled_set, load_label_table

    table = load_label_table(root, _write_csv(tmp_path / "labels.csv", ["path", "label", "group"], rows), "medical")
    data = build_labelled_set("medical", root, table, DataConfig(image_size=32, options={"cache": False}), None)
    by_patient: dict[str, set] = {}
    for r, g in zip(data.rows, data.groups):
        by_patient.setdefault(patient[table.paths[r]], set()).add(g)
    return data, by_patient


def test_a_patient_whose_csv_group_is_filled_for_some_slices_only_stays_on_one_side(tmp_path):
    """Files sharing a key (CSV group, patient) are one group: slices without a CSV group joined
    a group of their own file (or patient), apart from the patient's other slices."""
    root, files, patient = _ct_slices(tmp_path, 3)
    seen: dict[str, int] = {}
    rows = []
    for p in files:  # slices 0 and 2: group P-<patient>; slice 1: none
        k = seen[patient[p]] = seen.get(patient[p], -1) + 1
        rows.append([p.relative_to(root).as_posix(), p.parts[-4], "" if k == 1 else f"P-{patient[p]}"])
    data, by_patient = _groups_by_patient(tmp_path, root, patient, rows)
    assert all(len(g) == 1 for g in by_patient.values()) and len(set(data.groups.tolist())) == len(by_patient)
    assert data.group_source == "csv group column + patient"


def test_the_csv_group_decides_where_the_domains_key_says_otherwise(tmp_path, monkeypatch):
    """De-identification often leaves one PatientID for everyone: where a domain key spans
    several CSV groups, it links nothing and the CSV's groups stand."""
    import domains.medical as medical

    root, files, patient = _ct_slices(tmp_path, 2)
    anonymous = lambda paths, salt: ["0" * 24 for _ in paths]  # noqa: E731
    anonymous.source = "patient"
    monkeypatch.setattr(medical, "group_keys", anonymous)
    rows = [[p.relative_to(root).as_posix(), p.parts[-4], f"P-{patient[p]}"] for p in files]
    data, by_patient = _groups_by_patient(tmp_path, root, patient, rows)
    assert all(len(g) == 1 for g in by_patient.values()) and len(set(data.groups.tolist())) == len(by_patient)
    assert data.group_source == "csv group column"


def test_a_test_set_of_the_same_patients_is_refused_whatever_its_groups_are_named(tmp_path):
    # the training CSV named its groups, the test set had none (PatientID): the two never compared
    from domains.medical import make_demo_archive
    from fedmoco.data import DataConfig
    from fedmoco.errors import DataError
    from fedmoco.labels import build_labelled_set, check_disjoint, load_label_table

    root = make_demo_archive(tmp_path / "hospital", n_patients=4, seed=1, image_size=32, n_slices=2, labelled=True)
    files = sorted(p for p in root.rglob("*.dcm") if "unsorted" not in p.parts and p.parent.name == "ct")
    rows = [[p.relative_to(root).as_posix(), p.parts[-4]] for p in files]
    cfg = DataConfig(image_size=32, options={"cache": False})
    named = load_label_table(root, _write_csv(tmp_path / "train.csv", ["path", "label", "group"],
                                              [[*r, f"SYN-{p.parts[-3]}"] for r, p in zip(rows, files)]), "medical")
    plain = load_label_table(root, _write_csv(tmp_path / "test.csv", ["path", "label"], rows), "medical")
    train, test = (build_labelled_set("medical", root, t, cfg, None) for t in (named, plain))
    with pytest.raises(DataError, match="of the test set.s groups .* also occur in"):
        check_disjoint(train, test, root, root)


def test_a_test_set_of_patients_the_training_csv_split_into_groups_is_refused(tmp_path):
    """Training CSV groups per series split each patient: their patient keys grouped nothing and
    were compared with nothing, so the same patients copied into --test passed (found by an audit)."""
    import shutil

    from domains.medical import make_demo_archive
    from fedmoco.data import DataConfig
    from fedmoco.errors import DataError
    from fedmoco.labels import build_labelled_set, check_disjoint, load_label_table

    root = make_demo_archive(tmp_path / "hospital", n_patients=4, seed=1, image_size=32, n_slices=2, labelled=True)
    files = sorted(p for p in root.rglob("*.dcm") if "unsorted" not in p.parts and p.parent.name == "ct")
    rows = [[p.relative_to(root).as_posix(), p.parts[-4], f"{p.parts[-3]}-{p.name}"] for p in files]  # one a file
    copies = tmp_path / "test copy"
    for p in files[:4]:
        target = copies / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    cfg = DataConfig(image_size=32, options={"cache": False})
    train_table = load_label_table(root, _write_csv(tmp_path / "train.csv", ["path", "label", "group"], rows), "medical")
    test_rows = [[p.relative_to(root).as_posix(), p.parts[-4]] for p in files[:4]]
    test_table = load_label_table(copies, _write_csv(tmp_path / "test.csv", ["path", "label"], test_rows), "medical")
    train = build_labelled_set("medical", root, train_table, cfg, None)
    test = build_labelled_set("medical", copies, test_table, cfg, None)
    assert train.split_keys  # the per-file groups split every patient
    with pytest.raises(DataError, match="patient/scene key.s. of the test set also occur in .*, where the CSV's "
                                        "groups split them"):
        check_disjoint(train, test, root, copies)


def test_a_file_name_that_is_not_utf8_is_a_sample_like_any_other(tmp_path, demo_images):
    # writing the internal path-to-row CSV raised UnicodeEncodeError (a traceback, exit 1)
    import os
    import shutil

    from fedmoco.data import DataConfig
    from fedmoco.labels import build_labelled_set, load_label_table

    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    first = sorted((data / "circle").glob("*.png"))[0]
    os.rename(os.fsencode(first), os.fsencode(first.parent) + b"/caf\xe9.png")
    table = load_label_table(data, None, "images")
    labelled = build_labelled_set("images", data, table, DataConfig(image_size=32), None)
    assert len(labelled.targets) == len(list(demo_images.rglob("*.png")))
    assert any(os.fsencode(table.paths[r]).endswith(b"caf\xe9.png") for r in labelled.rows)


def test_an_out_that_cannot_be_a_folder_is_refused_before_any_training(tmp_path, demo_images, checkpoint, capsys,
                                                                       monkeypatch):
    import fedmoco.finetune as ft

    monkeypatch.setattr(ft, "run_protocol", lambda *a, **k: pytest.fail("trained before checking --out"))
    out = tmp_path / "afile"
    out.write_text("x")
    rc = main(["-q", "finetune", "--checkpoint", str(checkpoint), "--data", str(demo_images), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"fedmoco finetune: error: --out {out}: cannot be a results folder (File exists)"


def test_a_test_set_of_the_training_files_is_refused_when_the_training_csv_has_groups(tmp_path, demo_images):
    """images have no domain key: with a CSV group column the groups were the training set's only
    keys, and a test CSV of the very same files without groups (or with other group names) was
    accepted, the training images scored as the test set (found by an audit)."""
    from fedmoco.data import DataConfig
    from fedmoco.errors import DataError
    from fedmoco.labels import build_labelled_set, check_disjoint, load_label_table

    files = sorted(demo_images.rglob("*.png"))[:12]
    rows = [[f.relative_to(demo_images).as_posix(), f.parent.name] for f in files]
    cfg = DataConfig(image_size=16)
    grouped = _write_csv(tmp_path / "train.csv", ["path", "label", "group"],
                         [[*r, f"p{i // 2}"] for i, r in enumerate(rows)])
    renamed = _write_csv(tmp_path / "renamed.csv", ["path", "label", "group"],
                         [[*r, f"other{i}"] for i, r in enumerate(rows)])
    plain = _write_csv(tmp_path / "plain.csv", ["path", "label"], rows)
    train = build_labelled_set("images", demo_images, load_label_table(demo_images, grouped, "images"), cfg, None)
    for test_csv in (plain, renamed):
        test = build_labelled_set("images", demo_images, load_label_table(demo_images, test_csv, "images"), cfg, None)
        with pytest.raises(DataError, match="of the test set.s groups .* also occur in"):
            check_disjoint(train, test, demo_images, demo_images)
    others = sorted(demo_images.rglob("*.png"))[12:24]
    apart = _write_csv(tmp_path / "apart.csv", ["path", "label"],
                       [[f.relative_to(demo_images).as_posix(), f.parent.name] for f in others])
    check_disjoint(train, build_labelled_set("images", demo_images, load_label_table(demo_images, apart, "images"),
                                             cfg, None), demo_images, demo_images)  # other files pass


def test_a_csv_name_matches_a_file_stored_in_the_other_unicode_form(tmp_path, demo_images):
    """A CSV saying "café.png" (NFC) for a file stored as NFD (a folder copied from macOS) was
    refused as naming files that do not exist (found by an audit)."""
    import shutil
    import unicodedata

    from fedmoco.labels import load_label_table

    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    files = sorted((data / "circle").glob("*.png"))[:2] + sorted((data / "square").glob("*.png"))[:2]
    names = []
    for i, f in enumerate(files):
        name = unicodedata.normalize("NFD", f"café {i}.png")
        f.rename(f.parent / name)
        names.append(f"{f.parent.name}/" + unicodedata.normalize("NFC", f"café {i}.png"))
    assert not (data / names[0]).exists()  # the CSV's spelling is not the file's
    table = load_label_table(data, _write_csv(tmp_path / "nfc.csv", ["path", "label"],
                                              [[n, n.split("/")[0]] for n in names]), "images")
    assert sorted(p.name for p in table.paths) == sorted(unicodedata.normalize("NFD", f"café {i}.png")
                                                          for i in range(4))
