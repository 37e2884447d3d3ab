"""CI smoke test of examples/hospitals and examples/satellite-sites, simulation version.

Each runs the three roles at tiny sizes (``--quick``): generated site archives, a real
Flower simulation (SuperLink, ``flwr run``, Ray) of 2 sites and 1 round, then the data
scientist's ``fedmoco finetune`` (pretrained vs random init) and ``fedmoco export``. The
numbers at these sizes mean nothing; what is checked is that every role's output exists,
is what the README says, and that the labelled data carries the labels it claims.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# examples/ is run from the checkout (python -m examples.demo), not installed
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.demo import TASKS, main  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("domain", ["medical", "satellite"])
def test_example_simulation_walks_all_three_roles(tmp_path, domain, capsys):
    out = tmp_path / domain
    assert main(["--domain", domain, "--out", str(out), "--sites", "2", "--quick"]) == 0
    printed = capsys.readouterr().out

    # site admins: one unlabelled folder per site; the labelled set has path,label,group rows
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["site-0", "site-1"]
    assert not list((out / "sites").rglob("labels.csv"))
    with open(out / "labelled" / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["label"] for r in rows}) >= 2 and len({r["group"] for r in rows}) >= 3
    assert all((out / "labelled" / TASKS[domain].data_subdir / r["path"]).is_file() for r in rows)

    # coordinator: the aggregated encoder and the round log
    assert (out / "server" / "encoder.pt").is_file() and (out / "server" / "rounds.jsonl").is_file()

    # data scientist: the report compares with random init; the export loads
    results = json.loads((out / "finetune" / "results.json").read_text())
    for key in ("accuracy", "auroc", "sensitivity", "specificity", "n_test"):
        assert key in results and key in results["random_init"]
    if TASKS[domain].make_test is not None:  # scored on the separate held-out archive, all of it
        with open(out / "test" / "labels.csv") as fh:
            test_rows = list(csv.DictReader(fh))
        assert results["n_test"] == results["split"]["n_test"] == len(test_rows)
        assert not {r["group"] for r in test_rows} & {r["group"] for r in rows}
    info = json.loads((out / "export" / "encoder.json").read_text())
    scripted = torch.jit.load(str(out / "export" / "encoder.ts"))
    x = torch.zeros(2, info["channels"], info["image_size"], info["image_size"])
    assert scripted(x).shape == (2, info["feature_dim"])
    assert "(synthetic data)" in printed and "random init" in printed


def test_nodule_labels_match_the_pixels(tmp_path):
    """A 'nodule' slice holds a lesion of soft-tissue density surrounded by lung; a 'normal'
    one none; the archive's labels.csv says which, per slice, grouped by patient."""
    import pydicom
    from scipy.ndimage import binary_dilation

    from domains.medical.demo import make_nodule_archive, nodule_slices

    hu, labels, masks = nodule_slices(np.random.default_rng(5), 12, 64, noise=10.0, prevalence=0.5)
    assert hu.shape == masks.shape == (12, 64, 64) and set(labels) == {"nodule", "normal"}
    for s, label in enumerate(labels):
        m = masks[s]
        assert m.any() == (label == "nodule")
        if m.any():
            assert 5 <= m.sum() <= 3 * 60  # 1-3 lesions of 20-40 mm at 5.6 mm per pixel
            assert -20 < hu[s][m].mean() < 100  # solid: 10-70 HU plus noise
            ring = binary_dilation(m, iterations=2) & ~m
            assert np.median(hu[s][ring]) < -600  # it sits in lung parenchyma

    root = make_nodule_archive(tmp_path, n_patients=3, n_slices=4, image_size=32, seed=3)
    with open(root / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {r["group"] for r in rows} == {"SYN-0000", "SYN-0001", "SYN-0002"}
    ds = pydicom.dcmread(root / "dicom" / rows[0]["path"])
    assert ds.PatientID == rows[0]["group"] and ds.Modality == "CT" and ds.RescaleType == "HU"


def test_landcover_patches_have_their_class_spectrum(tmp_path):
    """Per pixel, NDVI separates vegetation from water under any illumination and haze, as in
    real 4-band imagery; the archive labels each patch with its majority class, by scene."""
    import rasterio

    from domains.satellite.demo import CLASSES, landcover_patch, make_landcover_archive

    rng = np.random.default_rng(2)
    for cls in range(4):
        for _ in range(5):
            cube, classes = landcover_patch(rng, 32, 4, cls)
            ndvi = (cube[3] - cube[2]) / (cube[3] + cube[2])
            if (classes == 1).sum() > 20:
                assert np.median(ndvi[classes == 1]) > 0.25
            if (classes == 0).sum() > 20:
                assert np.median(ndvi[classes == 0]) < 0.0
            assert (classes == cls).mean() >= 0.4

    root = make_landcover_archive(tmp_path, n_scenes=2, patches=3, patch_size=32, bands=4, seed=1)
    with open(root / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18 and {r["label"] for r in rows} <= set(CLASSES)
    assert {r["group"] for r in rows} == {"scene_000", "scene_001"}
    with rasterio.open(root / "patches" / rows[0]["path"]) as src:
        assert (src.count, src.width, src.height, src.dtypes[0]) == (4, 32, 32, "uint16")


def test_make_certs_refuses_a_validity_that_has_already_ended(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_certs", Path(__file__).resolve().parents[2]
                                                  / "examples" / "deployment" / "make_certs.py")
    make_certs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_certs)
    with pytest.raises(SystemExit) as exit_:
        make_certs.main([str(tmp_path / "certs"), "--days", "0"])
    assert exit_.value.code == 2 and "--days 0: must be 1-36500" in capsys.readouterr().err
    assert not (tmp_path / "certs").exists()


def test_roles_loopback_refuses_an_unknown_domain_before_making_its_folder(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "roles_loopback.sh"
    done = subprocess.run(["bash", str(script), "bogus", str(tmp_path / "work")], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "domain must be medical or satellite, got 'bogus'" in done.stderr
    assert not (tmp_path / "work").exists()
