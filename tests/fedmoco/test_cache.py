"""The decoded-sample cache file: filled lazily, shared across processes, invalidated by any change."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from fedmoco.cache import (MIN_FREE_BYTES, MIN_FREE_ENV, SampleCache, cache_fits, file_stamps, min_free_bytes,
                           open_cache, write_memo)


def _open(root, tmp_path, stamps, **options):
    return open_cache(root, "test", 5, (2, 3, 3), "float16", {"size": 3, **options}, stamps, tmp_path / "c")


def _one_file_folder(tmp_path):
    """A data folder holding one 10-byte file, and its stamps."""
    root = tmp_path / "data"
    root.mkdir(parents=True)
    (root / "a.bin").write_bytes(b"x" * 10)
    return root, file_stamps(root, [root / "a.bin"])


def test_samples_round_trip_and_survive_reopening(tmp_path):
    root, stamps = _one_file_folder(tmp_path)
    cache = _open(root, tmp_path, stamps)
    assert cache.get(0) is None and cache.filled() == 0
    sample = np.arange(18, dtype=np.float32).reshape(2, 3, 3) / 7
    cache.put(3, sample, tag=2)
    again = pickle.loads(pickle.dumps(_open(root, tmp_path, stamps)))  # what a DataLoader worker gets
    got, tag = again.get(3)
    assert tag == 2 and again.filled() == 1
    np.testing.assert_allclose(got, sample, rtol=1e-3)
    assert again.get(2) is None


def test_a_file_rewritten_with_its_mtime_put_back_rebuilds(tmp_path, rewrite_keeping_mtime):
    """Same size, same mtime (``cp -p`` of another file, a restore from backup): the ctime
    still tells the cache that its pixels may be stale."""
    root, stamps = _one_file_folder(tmp_path)
    first = _open(root, tmp_path, stamps)
    first.put(0, np.ones((2, 3, 3)))
    rewrite_keeping_mtime(root / "a.bin")
    again = _open(root, tmp_path, file_stamps(root, [root / "a.bin"]))
    assert again.path != first.path and again.filled() == 0 and not first.path.exists()


def test_change_of_file_or_options_rebuilds_and_deletes_the_old_cache(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    f = root / "a.bin"
    f.write_bytes(b"x" * 10)
    first = _open(root, tmp_path, file_stamps(root, [f]))
    first.put(0, np.ones((2, 3, 3)))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched (1 s: coarse file systems)
    touched = _open(root, tmp_path, file_stamps(root, [f]))
    assert touched.path != first.path and not first.path.exists() and touched.filled() == 0
    touched.put(0, np.ones((2, 3, 3)))
    f.write_bytes(b"y" * 11)  # modified
    modified = _open(root, tmp_path, file_stamps(root, [f]))
    assert modified.path != touched.path and modified.filled() == 0
    modified.put(0, np.ones((2, 3, 3)))
    other = _open(root, tmp_path, file_stamps(root, [f]), window="file")  # other options
    assert other.path != modified.path and other.filled() == 0
    assert sorted(p.name for p in (tmp_path / "c" / "samples").iterdir()) == [other.path.name]


def test_a_truncated_cache_file_is_recreated_empty(tmp_path):
    """A cache file cut short (a full disk, a crash while it was made) is not mapped as it is:
    it is made again at full size with nothing filled, so samples are decoded afresh."""
    root, stamps = _one_file_folder(tmp_path)
    cache = _open(root, tmp_path, stamps)
    cache.put(0, np.ones((2, 3, 3)))
    with open(cache.path, "r+b") as fh:
        fh.truncate(cache.nbytes // 2)  # sample 0's flag survives in the first half
    again = _open(root, tmp_path, stamps)
    assert again.path == cache.path and again.path.stat().st_size == again.nbytes
    assert again.filled() == 0 and again.get(0) is None


def test_cache_holds_no_path_or_file_name(tmp_path):
    root = tmp_path / "patient_DOE_JOHN"
    root.mkdir()
    f = root / "1.2.840.113619.2.55.dcm"
    f.write_bytes(b"x")
    cache = _open(root, tmp_path, file_stamps(root, [f]))
    cache.put(1, np.full((2, 3, 3), 0.5))
    blob = cache.path.read_bytes()
    assert b"DOE" not in blob and b"113619" not in blob
    assert "DOE" not in cache.path.name and "113619" not in cache.path.name


def test_unwritable_cache_folder_means_no_cache(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    blocker = tmp_path / "c"
    blocker.write_text("a file where the cache folder should be")
    assert open_cache(root, "test", 1, (1,), "uint8", {}, [], blocker) is None


def test_an_existing_cache_that_cannot_be_written_means_no_cache(tmp_path, monkeypatch, caplog):
    """A cache made earlier on a volume since remounted read-only (or another user's, mode
    0600) stopped the run at its first read ("Read-only file system"); now the round decodes
    every epoch, as with any cache it cannot have."""
    import errno

    root, stamps = _one_file_folder(tmp_path)
    cache = _open(root, tmp_path, stamps)
    cache.put(0, np.ones((2, 3, 3)))
    real_open = os.open

    def read_only_volume(path, flags, *args, **kwargs):
        if os.fspath(path) == os.fspath(cache.path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_volume)
    with caplog.at_level("WARNING", logger="fedmoco.cache"):
        assert _open(root, tmp_path, stamps) is None
    assert f"{cache.path}: cannot open the sample cache for writing (Read-only file system)" in caplog.text
    monkeypatch.undo()
    assert _open(root, tmp_path, stamps).get(0) is not None  # writable again: the same cache, still filled


def test_a_cache_removed_before_a_worker_maps_it_is_a_miss_not_a_crash(tmp_path, caplog):
    """A DataLoader worker maps the cache on first use; removed before that (fedmoco cache
    --clear, or a run with other options on the folder replacing its caches), the first read
    raised FileNotFoundError and stopped the run. Now it misses, and the sample is decoded."""
    root, stamps = _one_file_folder(tmp_path)
    cache = _open(root, tmp_path, stamps)
    cache.put(0, np.ones((2, 3, 3)))
    mapped = pickle.loads(pickle.dumps(cache))
    assert mapped.get(0) is not None  # mapped before the removal: keeps its mapping
    worker = pickle.loads(pickle.dumps(cache))  # not mapped yet
    cache.path.unlink()
    with caplog.at_level("WARNING", logger="fedmoco.cache"):
        assert worker.get(0) is None and worker.filled() == 0
    assert f"{cache.path}: sample cache gone or unreadable (No such file or directory); decoding instead" in caplog.text
    assert mapped.get(0)[1] == 1
    with pytest.raises(OSError):  # a store then fails as on a full disk: the datasets stop caching
        worker.put(1, np.ones((2, 3, 3)))


@pytest.mark.parametrize("reserve_gb, built", [("0", True), ("1e9", False)])
def test_a_cache_is_built_only_while_the_reserve_stays_free(tmp_path, monkeypatch, caplog, reserve_gb, built):
    """FEDMOCO_CACHE_MIN_FREE_GB is the free disk the cache leaves on its volume: no volume has
    10^18 bytes free, so that reserve refuses every cache, with one line naming the setting, and
    training decodes every epoch; a reserve of 0 builds it."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv(MIN_FREE_ENV, reserve_gb)
    cache = _open(root, tmp_path, [])
    assert (cache is not None) == built
    assert not built == ("kept free (FEDMOCO_CACHE_MIN_FREE_GB); decoding every epoch instead" in caplog.text)
    if not built:
        assert not list((tmp_path / "c" / "samples").glob("*.cache"))


@pytest.mark.parametrize("text", ["lots", "-1", "nan", "inf"])
def test_a_bad_reserve_setting_keeps_the_default_and_says_so(monkeypatch, caplog, text):
    monkeypatch.setenv(MIN_FREE_ENV, text)
    assert min_free_bytes() == MIN_FREE_BYTES == 2 * 2**30
    assert f"FEDMOCO_CACHE_MIN_FREE_GB={text!r} is not a number of GB >= 0; keeping 2.1 GB free" in caplog.text


def test_the_reserve_reads_gb_and_the_fit_asks_the_nearest_existing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(MIN_FREE_ENV, "1.5")
    assert min_free_bytes() == 1_500_000_000
    monkeypatch.setenv(MIN_FREE_ENV, "1e300")  # finite, but no int64: once an OverflowError that stopped training
    assert min_free_bytes() == 2**62
    monkeypatch.delenv(MIN_FREE_ENV)
    assert min_free_bytes() == MIN_FREE_BYTES
    monkeypatch.setattr("fedmoco.cache._free_bytes", lambda folder: {tmp_path: 10 * 2**30}[folder])
    assert cache_fits(tmp_path / "not" / "yet", 8 * 2**30) == (True, 10 * 2**30)  # exactly 2 GiB left
    assert cache_fits(tmp_path / "not" / "yet", 8 * 2**30 + 1) == (False, 10 * 2**30)
    assert not (tmp_path / "not").exists()


def test_a_slot_filled_in_parts_reads_as_unfilled_until_marked(tmp_path):
    """A raster is cached in parts straight into its file; a crash before the mark leaves it
    unfilled (refilled next time), never half-served. Parts land where their flat offset says,
    the neighbouring samples untouched, and nothing is written outside the sample."""
    root = tmp_path / "data"
    root.mkdir()
    cache = _open(root, tmp_path, [])
    cache.write(1, 0, np.full((3, 3), 1.5))
    assert cache.get(1) is None and cache.filled() == 0
    cache.write(1, 9, np.full(9, 2.5, np.float64))  # cast to the cache dtype
    cache.write(1, 12, np.array([7.0]))
    cache.mark(1)
    got, tag = cache.get(1)
    assert tag == 1 and got[0].tolist() == [[1.5] * 3] * 3 and got[1].tolist() == [[2.5, 2.5, 2.5], [7.0, 2.5, 2.5],
                                                                                   [2.5, 2.5, 2.5]]
    assert cache.get(0) is None and cache.get(2) is None
    cache.mark(2)
    assert not cache.get(2)[0].any()  # sample 2's bytes were never written
    with pytest.raises(IndexError, match="outside"):
        cache.write(1, 10, np.zeros(9))
    again = pickle.loads(pickle.dumps(SampleCache(cache.path, cache.n, cache.shape, cache.dtype, "random")))
    assert again.access == "random" and again.get(1)[0].tolist() == got.tolist()  # a worker's own mapping


def test_a_file_replaced_between_a_samples_pixels_and_its_flag_never_gets_the_flag(tmp_path, monkeypatch):
    """Run A wrote sample 0's pixels, then the cache was pruned and created again by run B (same
    options), then A marked sample 0: the flag went to B's new, empty file by path, so B served
    zeros as a filled sample (found by an audit). A write goes only to the file A mapped: the
    flag's write finds another file at the path and raises, the sample left unfilled (put's
    OSError, which its callers take as 'decode instead')."""
    from fedmoco.cache import prune_cache

    root, stamps = _one_file_folder(tmp_path)
    a = _open(root, tmp_path, stamps)
    real_mark = SampleCache.mark
    fresh = {}

    def replaced_before_the_flag(self, i, tag=1):
        prune_cache(tmp_path / "c")
        fresh["b"] = _open(root, tmp_path, stamps)
        real_mark(self, i, tag)

    monkeypatch.setattr(SampleCache, "mark", replaced_before_the_flag)
    with pytest.raises(FileNotFoundError, match="sample cache replaced since this process mapped it"):
        a.put(0, np.full((2, 3, 3), 4.0))
    assert fresh["b"].get(0) is None and fresh["b"].filled() == 0  # no flag without pixels
    monkeypatch.undo()
    fresh["b"].put(0, np.full((2, 3, 3), 5.0))  # the new file's own process fills it as usual
    assert fresh["b"].get(0)[0].tolist() == np.full((2, 3, 3), 5.0).tolist()


def test_a_cache_holds_no_descriptor_of_its_own_beyond_the_mapping(tmp_path):
    """A descriptor kept per cache (beside the one mmap holds) exhausted a 1024-descriptor limit at
    about 500 satellite rasters, each with its own cache (found by a review)."""
    folders = [_one_file_folder(tmp_path / f"site{i}") for i in range(5)]  # a cache per folder, as per raster
    before = len(os.listdir("/proc/self/fd"))
    caches = [_open(root, tmp_path, stamps) for root, stamps in folders]
    for c in caches:
        c.put(0, np.ones((2, 3, 3)))
    assert len(os.listdir("/proc/self/fd")) - before <= 5  # one per mapping, no more


def test_cache_usage_and_pruning_by_last_use(tmp_path):
    """A site admin sees what the caches take and removes those not used lately: the cache of a
    moved or deleted data folder is never used again, and nothing in it says whose it was."""
    import time

    from fedmoco.cache import cache_usage, prune_cache

    folder = tmp_path / "c"
    assert cache_usage(folder).files == () and cache_usage(folder).bytes == 0  # not created yet
    roots = [tmp_path / name for name in ("old", "new")]
    for root in roots:
        root.mkdir()
        open_cache(root, "test", 2, (64, 64), "float32", {}, [], folder).put(0, np.ones((64, 64)))
    write_memo(roots[0], "stats", {"k": 1}, {"mean": [0.5]}, folder)
    (folder / "samples" / "interrupted.cache.tmp").write_bytes(b"x" * 10)
    (folder / "medical-index").mkdir()
    (folder / "medical-index" / "0123456789abcdef.json").write_text("{}")  # a medical header index
    usage = cache_usage(folder)
    assert len(usage.files) == 5 and usage.bytes >= 2 * 64 * 64 * 4  # sparse: sample 1 was never written
    now = time.time()
    old = [p for p in usage.files if "interrupted" in p.name or p.suffix == ".json"]
    old.append(next(p for p in usage.files if p.suffix == ".cache"))
    for p in old:
        os.utime(p, (now - 10 * 86400, now - 10 * 86400))
    kept = prune_cache(folder, older_than_days=7, now=now)
    assert kept.removed == 4 and kept.freed > 0 and len(kept.files) == 1 and kept.files[0] not in old
    cleared = prune_cache(folder)
    assert cleared.removed == 1 and cleared.files == () and cleared.bytes == 0
    assert (folder / "samples").is_dir()  # the folder stays, empty


def test_fedmoco_cache_command_lists_and_clears(tmp_path, capsys):
    from fedmoco.cli import main

    root = tmp_path / "data"
    root.mkdir()
    _open(root, tmp_path, []).put(0, np.ones((2, 3, 3)))
    assert main(["cache", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {tmp_path / 'c'}\n" in out and "1 cache file(s)" in out and "(1 sample caches)" in out
    assert main(["cache", "--cache-dir", str(tmp_path / "c"), "--older-than", "1"]) == 0
    assert "removed 0 cache file(s), 0.0 MB not used for 1 days" in capsys.readouterr().out
    assert main(["cache", "--cache-dir", str(tmp_path / "c"), "--clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 cache file(s)" in out and "0 cache file(s), 0.0 MB on disk" in out
    assert main(["cache", "--cache-dir", str(tmp_path / "c"), "--older-than", "nan"]) == 2
    assert "--older-than must be a finite number >= 0, got nan" in capsys.readouterr().err
