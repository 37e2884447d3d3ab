"""``fedmoco sign-app`` and the SuperNode's check: only the signed files, by a trusted key."""

from __future__ import annotations

import io
import zipfile

import pytest

import json
import time

from fedmoco.appsign import SIGNATURE_FILE, build_fab, copy_app_files, parse_signed_after, sign_app, verify_fab
from fedmoco.cli import main
from fedmoco.errors import ConfigError
from fedmoco.keys import keygen

PYPROJECT = """\
[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmoco"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""


@pytest.fixture()
def app(tmp_path):
    root = tmp_path / "app"
    (root / "tinyapp").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "tinyapp" / "__init__.py").write_text("")
    (root / "tinyapp" / "client.py").write_text("app = None\n")
    (root / "tinyapp" / "server.py").write_text("app = None\n")
    return root


@pytest.fixture()
def signer(tmp_path):
    public, _ = keygen(tmp_path / "keys", "coordinator", "ed25519")
    return tmp_path / "keys" / "coordinator", {"coordinator": public.read_text().strip()}


def _rezip(fab: bytes, change) -> bytes:
    """A copy of ``fab`` with ``change(name, data) -> (name, data) | None`` applied to each entry."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            res = change(name, src.read(name))
            if res is not None:
                dst.writestr(*res)
    return out.getvalue()


def test_signed_app_verifies_and_an_unsigned_one_does_not(app, signer, capsys):
    key, trusted = signer
    unsigned = build_fab(app)
    assert "not signed" in verify_fab(unsigned, trusted)
    assert main(["sign-app", str(app), "--key", str(key), "--key-id", "coordinator"]) == 0
    assert "4 files signed as 'coordinator'" in capsys.readouterr().out  # pyproject + 3 modules
    fab = build_fab(app)  # what flwr run sends: rebuilt, with the signature inside
    assert SIGNATURE_FILE in zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert verify_fab(fab, trusted) is None


def test_any_change_after_signing_is_refused(app, signer):
    key, trusted = signer
    sign_app(app, key, "coordinator")
    fab = build_fab(app)
    tampered = _rezip(fab, lambda n, d: (n, d + b"import os; os.system('id')\n") if n.endswith("client.py") else (n, d))
    assert "does not match the app's files" in verify_fab(tampered, trusted)
    extra = io.BytesIO(fab)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("tinyapp/evil.py", "import os\n")
    assert "does not match" in verify_fab(extra.getvalue(), trusted)
    removed = _rezip(fab, lambda n, d: None if n.endswith("server.py") else (n, d))
    assert "does not match" in verify_fab(removed, trusted)
    # the same change made on disk and re-built is refused too, until signed again
    (app / "tinyapp" / "client.py").write_text("app = 1\n")
    assert "does not match" in verify_fab(build_fab(app), trusted)
    sign_app(app, key, "coordinator")
    assert verify_fab(build_fab(app), trusted) is None


def test_an_older_signed_version_is_refused_where_the_site_asks_for_a_newer_one(app, signer, capsys):
    """Replay: an app the coordinator signed before a fix still verifies; a site that starts its
    SuperNode with --app-signed-after refuses it, and the signed time cannot be moved forward
    without breaking the signature."""
    key, trusted = signer
    assert main(["sign-app", str(app), "--key", str(key), "--key-id", "coordinator"]) == 0
    signed_at = json.loads((app / SIGNATURE_FILE).read_text())["coordinator"]["signed_at"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(signed_at))
    assert f"sites start their SuperNode with --app-signed-after {stamp}" in capsys.readouterr().out
    old = build_fab(app)
    assert verify_fab(old, trusted, signed_after=signed_at) is None  # "at or after"
    reason = verify_fab(old, trusted, signed_after=signed_at + 1)
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(signed_at + 1))
    assert reason == (f"signed by coordinator at {stamp}, before this site's --app-signed-after {later}: "
                      "an older version of the app; the coordinator signs the current one")

    def move_forward(name, data):
        if name != SIGNATURE_FILE:
            return name, data
        record = json.loads(data)
        record["coordinator"]["signed_at"] = signed_at + 3600
        return name, json.dumps(record)

    assert "does not match" in verify_fab(_rezip(old, move_forward), trusted, signed_after=signed_at + 1)


@pytest.mark.parametrize("text, unix_s", [
    ("2026-11-29", 1_795_910_400),
    ("2026-11-29T14:00:00Z", 1_795_960_800),
    ("2026-11-29T15:00:00+01:00", 1_795_960_800),
    ("2026-11-29 14:00", 1_795_960_800),  # no zone: UTC
    ("1795960800", 1_795_960_800),
    # ISO 8601 basic: was read as 20,261,129 unix seconds (August 1970), replay protection off
    ("20261129", 1_795_910_400),
])
def test_app_signed_after_takes_a_date_a_time_or_unix_seconds(text, unix_s, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_796_000_000.0)
    assert parse_signed_after(text) == unix_s


@pytest.mark.parametrize("text, problem", [
    ("last tuesday", "not a date (2026-11-29, 2026-11-29T14:00:00Z) nor unix seconds"),
    ("", "not a date"),
    ("-5", "not a date"),
    ("2027-01-01", "lies in the future, so every app would be refused"),
])
def test_an_app_signed_after_value_that_would_mislead_is_refused(text, problem, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_796_000_000.0)
    with pytest.raises(ConfigError, match="^--app-signed-after ") as info:
        parse_signed_after(text)
    assert problem in str(info.value)


def test_untrusted_signer_is_refused(app, signer, tmp_path):
    _, trusted = signer
    keygen(tmp_path / "other", "coordinator", "ed25519")
    sign_app(app, tmp_path / "other" / "coordinator", "coordinator")  # same id, another key
    assert "does not match" in verify_fab(build_fab(app), trusted)
    sign_app(app, tmp_path / "other" / "coordinator", "someone")
    assert "none of which is a trusted entity" in verify_fab(build_fab(app), trusted)


@pytest.mark.parametrize("signature_file, reason", [
    ('{"coordinator": {"signature": "AAAA", "signed_at": -1}}', "does not match"),
    ('{"coordinator": {"signature": "AAAA", "signed_at": 1e30}}', "does not match"),
    ('{"coordinator": {"signature": "AAAA", "signed_at": 1e400}}', "does not match"),
    ('{"coordinator": {"signature": "AAAA", "signed_at": true}}', "does not match"),
    ("[" * 100_000 + "]" * 100_000, "not a readable FAB or signature file (RecursionError"),
])
def test_a_signature_file_shaped_to_crash_the_check_is_a_refusal(app, signer, signature_file, reason):
    """A hostile app's signature file (a time that does not fit 8 bytes, JSON nested past
    Python's recursion limit) is refused with a reason; the check never raises, which would
    stop the site's SuperNode."""
    _, trusted = signer
    fab = _rezip(build_fab(app), lambda n, d: (n, d))
    with_file = io.BytesIO(fab)
    with zipfile.ZipFile(with_file, "a") as zf:
        zf.writestr(SIGNATURE_FILE, signature_file)
    assert reason in verify_fab(with_file.getvalue(), trusted)


def test_sign_app_needs_an_ed25519_key(app, tmp_path, capsys):
    keygen(tmp_path / "k", "site")  # an EC SuperNode key
    assert main(["sign-app", str(app), "--key", str(tmp_path / "k" / "site"), "--key-id", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedmoco sign-app: error: {tmp_path / 'k' / 'site'}: not an Ed25519 key; "
                   "make one with: fedmoco keygen --type ed25519")
    with pytest.raises(ConfigError, match="--key-id 'a b'"):
        sign_app(app, tmp_path / "k" / "site", "a b")


def test_a_signed_copy_runs_while_the_source_stays_unchanged(app, signer, tmp_path):
    key, trusted = signer
    before = sorted(p.relative_to(app) for p in app.rglob("*"))
    copy = copy_app_files(app, tmp_path / "copy")
    sign_app(copy, key, "coordinator")
    assert sorted(p.relative_to(app) for p in app.rglob("*")) == before
    assert verify_fab(build_fab(copy), trusted) is None
    assert "not signed" in verify_fab(build_fab(app), trusted)


def test_the_app_carries_only_its_code_whatever_else_the_checkout_holds(tmp_path):
    """A demo written inside the checkout (README's --out hospitals-demo) must not ride along:
    its copies of earlier apps nested until Flower could not pack them, and a site's
    fedmoco-site.toml was signed into the app."""
    import io
    import shutil
    import zipfile
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk

    root = Path(__file__).resolve().parents[2]
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    for name in ("fedmoco/a.py", "domains/medical/b.py", "clients/c.py", "server/d.py", "examples/e.py", "README.md",
                 "fedmoco-app-signature.json",
                 "hospitals-demo/flower/flwr-home/apps/x/fedmoco/cli.py", "hospitals-demo/sites/site-0/fedmoco-site.toml",
                 "benchmarks/notes/n.md", "docs/f.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path))).namelist())
    assert {"fedmoco/a.py", "domains/medical/b.py", "clients/c.py", "server/d.py", "pyproject.toml",
            "fedmoco-app-signature.json"} <= names  # the signature travels with the app
    assert not {n for n in names if n.split("/")[0] in ("examples", "hospitals-demo", "benchmarks", "docs")}


def _with_filler(fab: bytes, nbytes: int) -> bytes:
    """``fab`` plus a file of ``nbytes`` zeros, deflated to a few hundred bytes per MiB."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        with dst.open("tinyapp/filler.bin", "w") as fh:
            for _ in range(nbytes >> 20):
                fh.write(bytes(2**20))
    return out.getvalue()


def test_a_strangers_app_is_refused_before_any_file_of_it_is_unpacked(app, signer, tmp_path, monkeypatch):
    # a 306 KB app of zeros from an untrusted signer unpacked to 300 MiB in the site's memory first
    import fedmoco.appsign as appsign

    _, trusted = signer
    keygen(tmp_path / "other", "stranger", "ed25519")
    sign_app(app, tmp_path / "other" / "stranger", "stranger")
    monkeypatch.setattr(appsign, "fab_manifest_digest", lambda fab: pytest.fail("unpacked a stranger's app"))
    assert "none of which is a trusted entity" in verify_fab(_with_filler(build_fab(app), 8 << 20), trusted)


def test_an_app_that_unpacks_past_the_cap_is_refused(app, signer, monkeypatch):
    import fedmoco.appsign as appsign

    key, trusted = signer
    sign_app(app, key, "coordinator")
    monkeypatch.setattr(appsign, "MAX_FAB_UNPACKED", 4 << 20)
    fab = _with_filler(build_fab(app), 8 << 20)
    assert len(fab) < 64 << 10  # 8 MiB of zeros in a few KB
    assert verify_fab(fab, trusted) == "the app is not a readable FAB (ValueError: the FAB unpacks to more than 4 MiB)"
