"""Every deployed round is a fresh flwr-clientapp process: a site imports only what it uses.

Each check runs in a fresh interpreter, as a round does, and reads ``sys.modules``.
The figures behind it: benchmarks/results/round_overhead.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WATCHED = ["rasterio", "pydicom", "monai", "matplotlib", "opacus", "fedmoco.privacy"]


def _imported_after(code: str, tmp_path: Path) -> set[str]:
    """The WATCHED modules in sys.modules after running ``code`` in a fresh interpreter."""
    return _watched_after(code, tmp_path, WATCHED)


def _watched_after(code: str, tmp_path: Path, watched: list[str]) -> set[str]:
    """The ``watched`` modules in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"FEDMOCO_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path),  # the suite's cache reserve (tests/conftest.py)
                              "FEDMOCO_CACHE_MIN_FREE_GB": os.environ["FEDMOCO_CACHE_MIN_FREE_GB"]})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_client_app_loads_no_domain_plotting_or_dp_library(tmp_path):
    loaded = _imported_after("import clients.app", tmp_path)
    assert not loaded & {"rasterio", "pydicom", "monai", "matplotlib", "opacus", "fedmoco.privacy"}, loaded


def test_a_medical_site_does_not_import_rasterio(tmp_path):
    code = (f"from domains.medical.demo import make_demo_archive\n"
            f"from fedmoco.data import DataConfig, build_pretrain_data\n"
            f"d = build_pretrain_data('medical', make_demo_archive({str(tmp_path / 'dicom')!r}, n_patients=1, "
            f"n_slices=2), DataConfig(image_size=32))\n"
            f"assert len(d.dataset) > 0 and d.dataset[0] is not None")
    loaded = _imported_after(code, tmp_path)
    assert "pydicom" in loaded and "monai" in loaded  # the probe did build a medical site
    assert "rasterio" not in loaded


def test_a_satellite_site_does_not_import_dicom_monai_or_plotting(tmp_path):
    code = (f"from pathlib import Path\n"
            f"from domains.satellite.demo import make_demo_archive\n"
            f"from fedmoco.data import DataConfig, build_pretrain_data\n"
            f"d = build_pretrain_data('satellite', make_demo_archive(Path({str(tmp_path / 'tif')!r}), bands=4), "
            f"DataConfig(image_size=32))\n"
            f"assert len(d.dataset) > 0 and d.dataset[0] is not None")
    loaded = _imported_after(code, tmp_path)
    assert "rasterio" in loaded
    assert not loaded & {"pydicom", "monai", "matplotlib", "opacus"}, loaded


def test_the_ledger_loads_opacus_only_when_it_accounts(tmp_path):
    """A site without a budget uses the ledger's status codes only; spending loads Opacus."""
    quiet = "from fedmoco.ledger import DP_STATUS, no_ledger_metrics\nm = no_ledger_metrics(4)\nassert m"
    assert "opacus" not in _imported_after(quiet, tmp_path)
    spend = ("from fedmoco.ledger import SiteLedger\nl = SiteLedger('prototypes', 1.0, 1e-5, 3)\n"
             "z = l.next_noise(1.0)\nl.record(z, 1.0)\nassert 0 < l.spent() <= 1.0")
    assert "opacus" in _imported_after(spend, tmp_path)


#: What a round that trains from a filled cache must not load: MONAI (all of it, 3-7 s), the
#: DICOM decoder, torchvision (its models and torch._dynamo, 2-4 s), scipy and scikit-learn.
PER_SAMPLE_ONLY = {"monai", "pydicom", "torchvision", "torch._dynamo", "scipy", "sklearn"}


def _round_from_cache(domain: str, make: str, tmp_path: Path) -> str:
    """Probe code: build the site's data and take two batches through the default loader."""
    return (f"from pathlib import Path\nimport torch\n"
            f"from clients.task import RUN_DEFAULTS, train_config\n"
            f"from fedmoco.data import DataConfig, build_pretrain_data\n"
            f"from fedmoco.train import make_loader\n"
            f"d = build_pretrain_data({domain!r}, {make}, DataConfig(image_size=32))\n"
            f"cfg = train_config({{**RUN_DEFAULTS, 'batch-size': 4}})\n"
            f"loader = make_loader(d.dataset, cfg, torch.device('cpu'))\n"
            f"for _ in range(2):\n"
            f"    (q, k), dropped = next(iter(loader))\n"
            f"    assert q.shape == k.shape == (4, d.in_channels, 32, 32) and dropped == 0\n")


def test_importing_a_domain_package_loads_none_of_its_libraries(tmp_path):
    loaded = _imported_after("import domains.medical, domains.satellite", tmp_path)
    assert not loaded, loaded
    heavy = _watched_after("import domains.medical, domains.satellite", tmp_path, sorted(PER_SAMPLE_ONLY))
    assert not heavy, heavy


def test_a_medical_round_from_the_cache_loads_neither_monai_nor_pydicom(tmp_path):
    folder = tmp_path / "dicom"
    make = (f"__import__('domains.medical.demo', fromlist=['x']).make_demo_archive({str(folder)!r}, "
            f"n_patients=1, n_slices=4)")
    first = _watched_after(_round_from_cache("medical", make, tmp_path), tmp_path, sorted(PER_SAMPLE_ONLY))
    assert "pydicom" in first  # the first round decodes the files to fill the cache...
    assert "monai" not in first  # ...but makes its views per batch, without MONAI
    later = _watched_after(_round_from_cache("medical", repr(str(folder)), tmp_path), tmp_path,
                           sorted(PER_SAMPLE_ONLY))
    assert not later, later  # a later round reads the index cache and the sample cache only


def test_a_satellite_round_from_the_cache_loads_no_torchvision(tmp_path):
    make = (f"__import__('domains.satellite.demo', fromlist=['x']).make_demo_archive("
            f"Path({str(tmp_path / 'tif')!r}), bands=4)")
    loaded = _watched_after(_round_from_cache("satellite", make, tmp_path), tmp_path,
                            sorted(PER_SAMPLE_ONLY | {"rasterio"}))
    assert "rasterio" in loaded  # the probe did scan a satellite site
    assert not loaded - {"rasterio"}, loaded


def test_per_sample_views_still_load_their_library(tmp_path):
    """The laziness moves the import, it does not drop the pipeline: batch_augment=off uses MONAI."""
    code = (f"from pathlib import Path\nimport torch\n"
            f"from domains.medical.demo import make_demo_archive\n"
            f"from fedmoco.config import TrainConfig\n"
            f"from fedmoco.data import DataConfig, build_pretrain_data\n"
            f"from fedmoco.train import make_loader\n"
            f"d = build_pretrain_data('medical', make_demo_archive({str(tmp_path / 'dicom')!r}, n_patients=1, "
            f"n_slices=2), DataConfig(image_size=32))\n"
            f"(q, k), _ = next(iter(make_loader(d.dataset, TrainConfig(batch_size=2, batch_augment='off', num_workers=0), "
            f"torch.device('cpu'))))\n"
            f"assert q.shape == (2, 1, 32, 32)")
    assert "monai" in _watched_after(code, tmp_path, ["monai"])


def test_a_dp_round_that_follows_its_plan_loads_no_opacus(tmp_path):
    """A site releasing DP prototypes pays the accountant (Opacus) when it plans, in its first
    round; later rounds read their noise and epsilon from the ledger file's plan, and the release
    mechanisms themselves need neither Opacus nor scipy."""
    ledger = tmp_path / "ledger.json"
    first = (f"from pathlib import Path\nfrom clients.ledger import locked_ledger\n"
             f"from fedmoco.ledger import SiteLedger\n"
             f"with locked_ledger(Path({str(ledger)!r})) as box:\n"
             f"    box['ledger'] = l = box['ledger'] or SiteLedger('prototypes', 1.5, 1e-5, 5)\n"
             f"    l.record(l.next_noise(1.0, 2.0), 1.0)\n")
    later = first + ("m = l.to_metrics(l.next_noise(1.0) is None)\nassert m['dp-keys-releases'] == 2.0\n"
                     "import torch\nfrom fedmoco.privacy import privatize_prototypes, seeded_centres\n"
                     "c = seeded_centres(4, 8, seed=0)\n"
                     "assert privatize_prototypes(torch.nn.functional.normalize(torch.randn(16, 8), dim=1), c, 3.0)"
                     ".shape[1] == 8\n")
    assert "opacus" in _watched_after(first, tmp_path, ["opacus"])
    assert not _watched_after(later, tmp_path, ["opacus", "scipy"])
    import json as _json

    state = _json.loads(ledger.read_text())
    assert state["history"][-1]["releases"] == 1 and len(state["plan"]["noise"]) == 5
