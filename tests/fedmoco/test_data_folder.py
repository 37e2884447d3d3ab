"""fedmoco.data.list_files: what a data folder's scan takes, leaves out, and says it left out."""

import logging
import os

import pytest

from fedmoco.data import list_files
from fedmoco.errors import DataError


def test_hidden_settings_links_and_unreadable_folders(tmp_path, monkeypatch, caplog):
    root = tmp_path / "site"
    (root / "a").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "locked").mkdir()
    for rel in ("a/1.png", "b.png", ".hidden.png", ".git/x.png", "locked/secret.png", "fedmoco-site.toml"):
        (root / rel).write_bytes(b"x")
    outside = tmp_path / "store.png"
    outside.write_bytes(b"x")
    (root / "linked.png").symlink_to(outside)  # a link to a file is followed
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")  # a link to nothing is counted
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link to a folder is not followed
    os.mkfifo(root / "pipe.png")  # never opened (a read would block); was left out without a word
    real_scandir = os.scandir

    def scandir(path="."):  # as a folder without read permission behaves for a non-root user
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="fedmoco.data"):
        files = list_files(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["a/1.png", "b.png", "linked.png"]
    assert (f"{root}: 1 folder(s) could not be read and were left out (first: {root / 'locked'}: Permission denied); "
            f"1 link(s) point to nothing (first: {root / 'gone.png'}); 1 entry is not a regular file (a FIFO, socket "
            f"or device) and left out (first: {root / 'pipe.png'})") in caplog.text


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="data folder is empty"):
        list_files(tmp_path)



@pytest.mark.parametrize("how", ["env", "option"])
def test_a_cache_folder_inside_the_data_folder_is_refused(tmp_path, monkeypatch, how):
    """The caches go outside the data folder, which is never written; one inside it was scanned
    as data the next time (counted as skipped files), so the setting is refused in one line."""
    from PIL import Image

    from fedmoco.data import DataConfig, build_pretrain_data

    root = tmp_path / "site"
    root.mkdir()
    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(root / f"{i}.png")
    cache = root / "cache"
    options = {}
    if how == "env":
        monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(cache))
    else:
        options = {"cache_dir": str(cache)}
    with pytest.raises(DataError) as err:
        build_pretrain_data("medical" if how == "option" else "images", root, DataConfig(image_size=8, options=options))
    assert str(err.value) == (f"{cache}: the cache folder is inside the data folder {root}, which fedmoco never "
                              "writes; set FEDMOCO_CACHE_DIR (or the cache_dir option) to a folder outside it")
    assert not cache.exists()
    if how == "env":  # with the caches off nothing is written there (an account whose home is its data folder)
        assert len(build_pretrain_data("images", root, DataConfig(image_size=8, cache=False)).dataset) == 2


def test_a_cache_folder_inside_the_data_folder_is_no_matter_when_the_domains_cache_option_is_off(
        hospital_site, monkeypatch):
    """A site whose data-options say cache=false writes no cache anywhere: a round refused its
    folder for a cache folder inside it all the same, where check-site (rightly) did not."""
    from fedmoco.data import DataConfig, build_pretrain_data

    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(hospital_site / "cache"))
    data = build_pretrain_data("medical", hospital_site, DataConfig(image_size=32, options={"cache": "false"}))
    assert len(data.dataset) > 0 and not (hospital_site / "cache").exists()
    with pytest.raises(DataError, match="the cache folder is inside the data folder"):
        build_pretrain_data("medical", hospital_site, DataConfig(image_size=32))


@pytest.fixture
def hospital_site(tmp_path):
    from domains.medical import make_demo_archive

    return make_demo_archive(tmp_path / "hospital", n_patients=2, seed=0, image_size=32)


def test_a_runs_own_normalisation_is_used_as_it_is_and_must_fit_the_data():
    from fedmoco.data import DataConfig, Normalization
    from fedmoco.errors import DataError

    own = Normalization([0.1, 0.2], [0.3, 0.4])
    never = lambda: (_ for _ in ()).throw(AssertionError("estimated although the run has one"))  # noqa: E731
    assert DataConfig(normalization=own).run_normalization(2, never) is own
    assert DataConfig().run_normalization(2, lambda: own) is own
    with pytest.raises(DataError, match=r"the run's normalisation has 2 channel\(s\), the data 13: this is not "
                                        "the data the run was trained on"):
        DataConfig(normalization=own).run_normalization(13, never)
