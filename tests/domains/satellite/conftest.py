"""Generated satellite archives shared by the satellite tests (small: 32 px tiles)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo4(tmp_path_factory):
    from domains.satellite import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("sat4"), bands=4, seed=0, tile_size=32)


@pytest.fixture(scope="session")
def demo13(tmp_path_factory):
    from domains.satellite import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("sat13"), bands=13, seed=1, tile_size=32)


@pytest.fixture(scope="session")
def labelled4(tmp_path_factory):
    from domains.satellite import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("sat4l"), bands=4, seed=2, tile_size=32, labelled=True)
