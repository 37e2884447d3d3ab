"""Fixtures of the medical-domain tests: generated DICOM files only (no downloads)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_archive(tmp_path_factory):
    """The default synthetic hospital archive (4 patients, 64 px), shared read-only."""
    from domains.medical import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("hospital"), seed=0)


@pytest.fixture(scope="session")
def labelled_archive(tmp_path_factory):
    """Six patients in one sub-folder per phantom (chest, abdomen, head)."""
    from domains.medical import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("labelled"), n_patients=6, seed=1, labelled=True)


@pytest.fixture
def cache_dir(tmp_path):
    """A private index-cache folder, so no test touches ~/.cache."""
    return tmp_path / "cache"
