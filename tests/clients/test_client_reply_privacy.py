"""A site's reply carries weights, noisy keys and numbers: never pixels, never DICOM identifiers.

The ClientApp runs on a generated hospital archive whose files hold PatientName,
PatientID, AccessionNumber and UIDs; every Message it returns is inspected record by
record and as the bytes that would travel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from client_test_helpers import context, global_model, run_config, train_message
from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from clients.app import app
from clients.task import shared_arrays
from server.validation import REQUIRED_METRICS

IMAGE_SIZE = 64
IDENTIFYING = ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    from domains.medical.demo import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("hospital"), n_patients=3, seed=5, image_size=IMAGE_SIZE)


def identifiers(root: Path) -> set[str]:
    """Every identifying value in the archive, and its file and folder names (>= 6 characters:
    shorter strings occur by chance in several MB of float bytes)."""
    found: set[str] = set()
    for path in root.rglob("*.dcm"):
        found.update(n for n in (path.name, path.parent.name) if len(n) >= 6)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the archive holds broken files on purpose
            continue
        for kw in IDENTIFYING:
            value = str(getattr(ds, kw, "") or "")
            if len(value) >= 6:
                found.add(value)
    return found


def wire_bytes(msg) -> bytes:
    """The message as it would travel: every object of its tree, serialised."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def test_replies_hold_no_pixels_and_no_identifiers(archive):
    ids = identifiers(archive)
    assert any(i.startswith("Demo^Patient") for i in ids) and any(i.startswith("DEMO-") for i in ids)
    run = run_config(**{"domain": "medical", "image-size": IMAGE_SIZE, "key-sample-rate": 1.0, "max-keys": 16,
                        "max-steps-per-epoch": 1})
    ctx = context({"data-path": str(archive)}, run)
    g = shared_arrays(global_model(run))
    replies = [app(train_message(g, r), ctx) for r in (1, 2)]
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        assert set(content.keys()) == {"arrays", "keys", "metrics"}
        assert not content.config_records  # no strings travel at all
        assert isinstance(content["metrics"], MetricRecord) and set(content["metrics"]) == set(REQUIRED_METRICS)
        for name, record in content.array_records.items():
            assert isinstance(record, ArrayRecord)
            for array_name, arr in record.items():
                shape = tuple(arr.shape)
                assert not (len(shape) >= 2 and shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)), (name, array_name, shape)
                assert not (len(shape) == 4 and shape[1] == 1 and shape[2] >= 16 and shape[2] == shape[3]), \
                    (name, array_name, shape)
        assert content["keys"]["keys"].shape[1] == 16  # keys are (n, D) embeddings
        blob = wire_bytes(reply)
        for ident in ids:
            assert ident.encode() not in blob, ident
        assert str(archive).encode() not in blob
        assert not np.isnan(content["metrics"]["train-loss"])


# -- error replies: a code and a reason, never a path or an exception's text ---------------
PATIENT = "Doe^Jane_1957"


def test_missing_folder_reply_names_no_path(tmp_path, caplog):
    from clients.app import SITE_DATA_UNAVAILABLE

    missing = tmp_path / PATIENT / "ct-export"
    run = run_config(**{"domain": "medical", "image-size": IMAGE_SIZE})
    with caplog.at_level("ERROR", logger="flwr.fedmoco.client"):
        reply = app(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(missing)}, run))
    assert reply.has_error() and reply.error.code == SITE_DATA_UNAVAILABLE
    assert reply.error.reason == "site data unavailable: the data folder (node_config data-path) does not exist"
    assert PATIENT.encode() not in wire_bytes(reply) and str(tmp_path).encode() not in wire_bytes(reply)
    assert str(missing) in caplog.text  # the site's admin still learns which folder


def test_folder_without_usable_images_reply_names_no_file(tmp_path, caplog):
    from clients.app import SITE_DATA_UNAVAILABLE

    site = tmp_path / PATIENT
    site.mkdir()
    (site / f"{PATIENT}.dcm").write_bytes(b"not a dicom file")
    run = run_config(**{"domain": "medical", "image-size": IMAGE_SIZE})
    with caplog.at_level("ERROR", logger="flwr.fedmoco.client"):
        reply = app(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(site)}, run))
    assert reply.has_error() and reply.error.code == SITE_DATA_UNAVAILABLE
    assert reply.error.reason.startswith("site data unavailable: <data-path>") and "1 not DICOM" in reply.error.reason
    assert PATIENT.encode() not in wire_bytes(reply)
    assert str(site) in caplog.text


def test_an_exception_becomes_a_reply_without_its_text(archive, monkeypatch, caplog):
    import clients.app as client_app
    from clients.app import SITE_FAILED

    secret = f"/pacs/export/{PATIENT}/series-7/IM0001.dcm"

    def explode(*args, **kwargs):
        raise RuntimeError(f"{secret}: decoder crashed")

    monkeypatch.setattr(client_app, "_restore_model", explode)
    run = run_config(**{"domain": "medical", "image-size": IMAGE_SIZE, "max-steps-per-epoch": 1})
    with caplog.at_level("ERROR", logger="flwr.fedmoco.client"):
        reply = app(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(archive)}, run))
    assert reply.has_error() and reply.error.code == SITE_FAILED
    assert reply.error.reason == "training failed at the site (RuntimeError); the site's log has the details"
    blob = wire_bytes(reply)
    assert PATIENT.encode() not in blob and b"decoder crashed" not in blob and b"/pacs" not in blob
    assert secret in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("text, public", [
    ("configuration: data-options: expected key=value, got 'cache_dir=/home/Doe^Jane/c'",
     "configuration: data-options: expected key=value, got '<path>'"),
    ("C:\\PACS\\Doe^Jane\\a.dcm: unreadable", "<path> unreadable"),
    ("relative Doe^Jane/scan.dcm and ./x", "relative <path> and <path>"),
    ("two\nlines", "two lines"),
])
def test_public_reason_scrubs_paths(text, public):
    from clients.app import public_reason

    assert public_reason(text) == public


def test_a_file_with_spaces_under_the_sites_folder_is_scrubbed_whole(tmp_path):
    """A file name under the data folder may hold spaces ("Jane Doe 01.png"): it is scrubbed up
    to the next delimiter, not to the next space, in error replies of every kind."""
    from clients.app import _data_unavailable, public_reason

    why = "cannot identify image file"
    for name in ("Jane Doe 01.png", "Doe, Jane 01.png", "O'Brien Mary 01.png", "Doe (Jane); 1961.png"):
        text = f"1 unreadable (first: /data/site/{name}: {why} '/data/site/{name}')"
        assert public_reason(text, ["/data/site"]) == f"1 unreadable (first: <path>: {why} '<path>')", name
    data = tmp_path / "site"
    data.mkdir()
    detail = f"{data}: no readable image (1 unreadable (first: {data}/Jane Doe 01.png: {why}))"
    assert _data_unavailable(data, detail) == (
        f"site data unavailable: <data-path>: no readable image (1 unreadable (first: <data-path>: {why}))")
    # a folder named alone keeps the words after it
    assert public_reason("/data/site is not a folder", ["/data/site"]) == "<path> is not a folder"


def test_a_bad_setting_under_a_folder_with_spaces_does_not_leak_the_folder(tmp_path):
    """A path with spaces is several tokens: the site's own node_config paths are scrubbed whole."""
    from domains.images.demo import make_demo_images

    data = make_demo_images(tmp_path / "Doe Jane 1961" / "images", n_per_class=4, size=16)
    # the bad delta comes from the site's settings file, which the message names
    (data / "fedmoco-site.toml").write_text('dp-epsilon = 4.0\ndp-delta = 0.5\n')
    run = run_config(**{"key-release": "prototypes", "in-channels": 3})
    reply = app(train_message(shared_arrays(global_model(run)), 1),
                context({"data-path": str(data), "state-dir": str(tmp_path / "Doe Jane 1961 state")}, run))
    assert reply.has_error()
    assert "dp-delta" in reply.error.reason and "Jane" not in reply.error.reason, reply.error.reason
    assert b"Jane" not in wire_bytes(reply)


def test_a_relative_data_path_without_a_slash_does_not_leak(tmp_path, monkeypatch):
    """node_config data-path "Doe Jane 1961", relative to the SuperNode's folder: only the part of
    the message with a slash was scrubbed, and "Doe Jane" reached the server."""
    from domains.images.demo import make_demo_images

    monkeypatch.chdir(tmp_path)
    data = make_demo_images(tmp_path / "Doe Jane 1961", n_per_class=4, size=16)
    (data / "fedmoco-site.toml").write_text('dp-epsilon = 4.0\ndp-delta = 0.5\n')
    run = run_config(**{"key-release": "prototypes", "in-channels": 3})
    reply = app(train_message(shared_arrays(global_model(run)), 1),
                context({"data-path": "Doe Jane 1961", "state-dir": "state"}, run))
    assert reply.has_error() and "dp-delta" in reply.error.reason, reply.error.reason
    assert b"Doe" not in wire_bytes(reply) and b"Jane" not in wire_bytes(reply)


def test_names_and_header_values_read_from_the_data_do_not_reach_the_server(tmp_path):
    """Error texts built from the data stay at the site: another domain's files named by UIDs
    (the scan listed their suffixes, pieces of the UIDs), and images it cannot read (their
    declared sizes, the decoder's words). The reply says what to fix in words and counts."""
    from clients.app import SITE_DATA_UNAVAILABLE

    run = run_config(**{"domain": "images", "in-channels": 1, "image-size": 16})
    uids = tmp_path / "uids"
    uids.mkdir()
    for uid in ("1.2.840.113619.2.55.604688", "1.2.840.113619.2.55.771203"):
        (uids / uid).write_bytes(b"DICM")
    reply = app(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(uids)}, run))
    assert reply.has_error() and reply.error.code == SITE_DATA_UNAVAILABLE
    assert reply.error.reason == ("site data unavailable: data folder is empty (no files with suffix .png, .jpg, "
                                  ".jpeg, .tif, .tiff, .bmp); it holds 2 other file(s): is the domain right?")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(2):
        (broken / f"scan_{i}_1961.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    reply = app(train_message(shared_arrays(global_model(run)), 1), context({"data-path": str(broken)}, run))
    assert reply.has_error() and reply.error.code == SITE_DATA_UNAVAILABLE
    assert reply.error.reason == "site data unavailable: none of the 2 images could be read", reply.error.reason


def test_the_quadratic_path_pattern_sees_a_bounded_prefix_of_a_huge_reason(monkeypatch):
    """A run_config value can end up in an error reason. The path pattern backtracks
    quadratically over a run without separators (a 1 MB value took about an hour), so it is
    given a bounded prefix of the text, still longer than the 300 characters kept."""
    import clients.app as client_app

    seen: list[int] = []
    real = client_app._PATHLIKE

    class Spy:
        def sub(self, repl, text):
            seen.append(len(text))
            return real.sub(repl, text)

    monkeypatch.setattr(client_app, "_PATHLIKE", Spy())
    huge = "data-options: " + "x" * 1_000_000
    assert client_app.public_reason(huge) == huge[:300]
    assert seen == [2000]


@pytest.mark.parametrize("where", ["data-options", "environment"])
def test_a_cache_inside_a_linked_data_folder_with_spaces_does_not_leak_the_folder(tmp_path, monkeypatch, where):
    """data-path is a link to "Doe Jane 1961" and the cache folder lies inside it (named in the
    site's data-options or by FEDMOCO_CACHE_DIR). The reason named the folder through its
    resolved form, which no scrub knew whole, so "Jane" reached the server (found by an audit)."""
    from domains.images.demo import make_demo_images

    real = make_demo_images(tmp_path / "Doe Jane 1961", n_per_class=4, size=16)
    (tmp_path / "site").symlink_to(real)
    node = {"data-path": str(tmp_path / "site")}
    if where == "data-options":
        node["data-options"] = f"cache_dir={real}/cache"
    else:
        monkeypatch.setenv("FEDMOCO_CACHE_DIR", f"{real}/.cache")
    run = run_config(**{"in-channels": 3})
    reply = app(train_message(shared_arrays(global_model(run)), 1), context(node, run))
    assert reply.has_error() and "cache folder is inside the data folder" in reply.error.reason, reply.error.reason
    assert b"Doe" not in wire_bytes(reply) and b"Jane" not in wire_bytes(reply)


def test_the_sites_own_folders_are_scrubbed_whole_in_a_data_unavailable_reason(tmp_path, monkeypatch):
    """Every form of the site's paths (a value inside data-options, the environment's cache
    folder, the data folder resolved through a link) is scrubbed whole, spaces and all."""
    from clients.app import _data_unavailable, _site_paths

    real = tmp_path / "Doe Jane 1961"
    real.mkdir()
    (tmp_path / "site").symlink_to(real)
    monkeypatch.setenv("FEDMOCO_CACHE_DIR", str(tmp_path / "Roe Ann 1970" / "cache"))
    for sep in (",", ";"):  # both ways options are separated (clients.task.parse_options)
        node = {"data-path": str(tmp_path / "site"), "data-options": f"sampling=grid{sep}cache_dir={tmp_path}/Poe Ed 1809"}
        paths = _site_paths(context(node, run_config()))
        for folder in (real, tmp_path / "Roe Ann 1970" / "cache", tmp_path / "Poe Ed 1809"):
            text = _data_unavailable(tmp_path / "site", f"{folder}: no readable image", paths)
            assert text == "site data unavailable: <path>: no readable image", (sep, text)
