"""Every deployed round is a fresh flwr-clientapp process: a site imports only what it uses.

Each check runs in a fresh interpreter, as a round does, and reads ``sys.modules``.
The figures behind it: benchmarks/results/round_overhead.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WATCHED = ["rasterio", "pydicom", "monai", "matplotlib", "opacus", "fedmoco.privacy"]


def _imported_after(code: str, tmp_path: Path) -> set[str]:
    """The WATCHED modules in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {WATCHED!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"FEDMOCO_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path)})
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
