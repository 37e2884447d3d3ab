import json
import math
import os

import numpy as np
import pytest

from fedmoco.atomic import atomic_write, atomic_write_json, json_safe


def test_json_safe_gives_standard_json():
    value = {"auroc": np.float32(0.75), "n": np.int64(3), "per_class": [math.nan, 1.0, -math.inf],
             1: (np.float64(np.nan),), "_scores": "in memory only"}
    assert json_safe(value) == {"auroc": 0.75, "n": 3, "per_class": [None, 1.0, None], "1": [None],
                                "_scores": "in memory only"}
    assert "_scores" not in json_safe(value, skip_private=True)
    json.loads(json.dumps(json_safe(value)), parse_constant=lambda c: pytest.fail(f"bare {c}"))


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_json(tmp_path / "knn.json", {"accuracy": 0.5})

    def broken(fh):
        fh.write(b'{"accuracy": 0.')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert os.listdir(tmp_path) == ["knn.json"]


def test_results_follow_the_umask_and_keys_keep_their_mode(tmp_path):
    import os
    import stat

    from fedmoco.atomic import atomic_write, atomic_write_text

    old = os.umask(0o027)
    try:
        report = atomic_write_text(tmp_path / "results.json", "{}")
        key = atomic_write(tmp_path / "site.key", lambda fh: fh.write(b"secret"), mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.stat().st_mode) == 0o640  # as open() would give: 0666 & ~umask
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize("cause", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupt_or_full_disk_inside_torch_save_surfaces_as_itself(tmp_path, cause):
    from fedmoco.atomic import atomic_write, remove_stale_temps

    def torch_like_save(fh):  # torch.save's zip writer replaces the cause in its __exit__
        fh.write(b"partial")
        try:
            raise cause
        except BaseException:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    with pytest.raises(type(cause)):
        atomic_write(target, torch_like_save)
    assert target.read_bytes() == b"previous" and not list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"left by a SIGKILL")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"another file's")
    assert remove_stale_temps(target) == 1 and (tmp_path / ".other.pt.abc123.tmp").exists()


def test_the_temp_file_is_beside_the_target_and_synced_before_the_rename(tmp_path, monkeypatch):
    """Durability: the bytes reach the disk (fsync) before the rename makes them the file, and
    the temp file is in the target's folder, so the rename is atomic (never across filesystems)."""
    calls, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.dirname(os.path.abspath(src))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = atomic_write(tmp_path / "ledger.json", lambda fh: fh.write(b"{}"))
    assert calls[:2] == [("fsync", path.stat().st_ino), ("replace", str(tmp_path))]  # the file itself, then the rename
    # then the folder, so that the rename itself survives a power cut (a ledger must never come
    # back smaller than what was already sent)
    assert calls[2:] == [("fsync", tmp_path.stat().st_ino)]
