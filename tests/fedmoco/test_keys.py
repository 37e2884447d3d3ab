"""``fedmoco keygen``: keys Flower accepts, 0600 private files, kept pairs, half pairs refused."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedmoco.cli import main
from fedmoco.errors import ConfigError
from fedmoco.keys import keygen, write_secret


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_a_pair_flower_loads(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path), "--name", "hospital-a"]) == 0
    private, public = tmp_path / "hospital-a", tmp_path / "hospital-a.pub"
    assert _mode(private) == 0o600 and _mode(public) == 0o644
    # what flower-supernode --auth-supernode-private-key and flwr supernode register load
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
    out = capsys.readouterr().out
    assert "hospital-a.pub (public: send this file to the coordinator)" in out
    assert "mode 0600" in out


def test_ed25519_signing_key(tmp_path):
    public, created = keygen(tmp_path, "coordinator-signing", "ed25519")
    assert created and public.read_text().startswith("ssh-ed25519 ")
    key = serialization.load_ssh_private_key((tmp_path / "coordinator-signing").read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)


def test_private_key_is_0600_even_over_a_world_readable_file(tmp_path):
    private = tmp_path / "supernode"
    private.write_text("old")
    os.chmod(private, 0o644)
    (tmp_path / "supernode.pub").write_text("old")
    keygen(tmp_path, force=True)
    assert _mode(private) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    # write_secret directly, over a 0666 file
    target = tmp_path / "other"
    target.write_bytes(b"x")
    os.chmod(target, 0o666)
    write_secret(target, b"secret")
    assert _mode(target) == 0o600 and target.read_bytes() == b"secret"


def test_existing_pair_is_kept_and_its_mode_tightened(tmp_path, capsys):
    keygen(tmp_path)
    before = (tmp_path / "supernode").read_bytes()
    os.chmod(tmp_path / "supernode", 0o640)
    assert main(["keygen", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "supernode").read_bytes() == before  # not regenerated: the registered key stays valid
    assert _mode(tmp_path / "supernode") == 0o600
    assert "kept " in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["supernode", "supernode.pub"])
def test_half_present_pair_is_one_line_error(tmp_path, capsys, missing):
    keygen(tmp_path)
    present = ({"supernode", "supernode.pub"} - {missing}).pop()
    kept = (tmp_path / present).read_bytes()
    (tmp_path / missing).unlink()
    assert main(["keygen", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"fedmoco keygen: error: {tmp_path / missing}: missing, but {tmp_path / present} exists")
    assert "half a key pair" in err
    assert (tmp_path / present).read_bytes() == kept and not (tmp_path / missing).exists()


def test_mismatched_pair_is_an_error(tmp_path):
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    (tmp_path / "a" / "supernode.pub").write_bytes((tmp_path / "b" / "supernode.pub").read_bytes())
    with pytest.raises(ConfigError, match=r"supernode.pub: is not the public key of .*a/supernode$"):
        keygen(tmp_path / "a")


def test_bad_name_is_refused(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path), "--name", "../x"]) == 2
    assert "--name '../x': use a plain file name" in capsys.readouterr().err
