"""Key pairs made where they are used: ``fedmoco keygen``.

A site makes its SuperNode authentication key on its own machine; only the public half
(``NAME.pub``) is sent to the coordinator, who registers it with
``flwr supernode register NAME.pub``. The coordinator makes its app-signing key the same way
(``--type ed25519``) and sends the public half to every site for ``--trusted-entities``.

Files: ``DIR/NAME`` (private, OpenSSH PEM, mode 0600) and ``DIR/NAME.pub`` (one OpenSSH
line, mode 0644). Both are written atomically (temporary file created 0600, then renamed),
so an existing file of another mode is replaced by one that is 0600 from its first byte.
A pair found complete is kept (and its private file's mode tightened to 0600) unless
``--force``; a pair with one half missing, or two halves that do not belong together, is an
error: silently making a new private key would lock the site out of a federation that
registered the old public key.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedmoco.atomic import atomic_write
from fedmoco.errors import ConfigError

#: Key types: what Flower expects where the key is used.
KEY_TYPES = {
    # flower-supernode --auth-supernode-private-key / flwr supernode register: an EC key
    "ecdsa-p384": "SuperNode authentication (flower-supernode --auth-supernode-private-key)",
    # flower-supernode --trusted-entities: Ed25519 public keys only
    "ed25519": "app signing (the public key goes into the sites' --trusted-entities file)",
}
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def write_secret(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> Path:
    """Write ``data`` to ``path`` atomically with permission bits ``mode``.

    The temporary file is created 0600 by ``mkstemp`` and ``fchmod``-ed to ``mode`` before
    any byte is written, then renamed over ``path``: whatever the mode of a file that was
    there, the result has ``mode`` and no reader ever sees a partial key.
    """
    return atomic_write(path, lambda fh: fh.write(data), mode=mode)


def generate_key_pair(key_type: str = "ecdsa-p384") -> tuple[bytes, bytes]:
    """A new ``(private, public)`` pair, both OpenSSH-encoded; ``public`` ends with a newline."""
    if key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError(f"--type: {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def public_key_of(private_path: Path) -> bytes:
    """The OpenSSH public line (no newline) of the OpenSSH private key in ``private_path``."""
    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{private_path}: not an unencrypted OpenSSH private key ({exc})") from None
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def check_pair(private_path: Path, public_path: Path) -> bool:
    """True if both files exist and match, False if neither exists; ConfigError otherwise."""
    have_private, have_public = private_path.exists(), public_path.exists()
    if not have_private and not have_public:
        return False
    if have_private != have_public:
        present, missing = (private_path, public_path) if have_private else (public_path, private_path)
        raise ConfigError(f"{missing}: missing, but {present} exists (half a key pair); restore {missing}, "
                          f"or delete {present} and run keygen again (then register the new public key)")
    stored = public_path.read_bytes().split()
    if stored[:2] != public_key_of(private_path).split()[:2]:
        raise ConfigError(f"{public_path}: is not the public key of {private_path}")
    return True


def keygen(out: Path, name: str = "supernode", key_type: str = "ecdsa-p384", force: bool = False) -> tuple[Path, bool]:
    """Make (or keep) the key pair ``out/name`` + ``out/name.pub``.

    Returns ``(public key path, created)``. A kept pair's private file is set to 0600.
    """
    if not name or "/" in name or name.startswith(".") or name.endswith(".pub"):
        raise ConfigError(f"--name {name!r}: use a plain file name such as 'hospital-a'")
    private_path, public_path = out / name, out / f"{name}.pub"
    if not force and check_pair(private_path, public_path):
        os.chmod(private_path, PRIVATE_MODE)
        return public_path, False
    private, public = generate_key_pair(key_type)
    # private first: a crash in between leaves a half pair, which the next run reports
    write_secret(private_path, private)
    write_secret(public_path, public, PUBLIC_MODE)
    return public_path, True


def _yaml_key(name: str) -> str:
    """``name`` as a YAML mapping key that reads back as that string: as it is where it does
    (coordinator), quoted where YAML would read a number, a boolean or null (2026, yes, on):
    unquoted, keygen printed a trusted-entities line the SuperNode refused (found by an audit)."""
    import yaml

    try:
        loaded = yaml.safe_load(f"{name}: x")
    except yaml.YAMLError:
        loaded = None
    return name if isinstance(loaded, dict) and list(loaded) == [name] else json.dumps(name)


def add_keygen_parser(sub) -> argparse.ArgumentParser:
    """Register ``fedmoco keygen`` on an argparse sub-parser collection."""
    p = sub.add_parser("keygen", help="make this site's key pair; only NAME.pub leaves the machine",
                       description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for NAME and NAME.pub (e.g. /etc/fedmoco/keys)")
    p.add_argument("--name", default="supernode", help="file name of the private key (default: supernode)")
    p.add_argument("--type", dest="key_type", default="ecdsa-p384", choices=list(KEY_TYPES),
                   help="ecdsa-p384: SuperNode authentication (default); ed25519: the coordinator's app-signing key")
    p.add_argument("--force", action="store_true", help="replace an existing pair (its public key must be registered again)")
    return p


def cmd_keygen(args: argparse.Namespace) -> int:
    """``fedmoco keygen``: print what was made and what to send where."""
    public_path, created = keygen(args.out, args.name, args.key_type, args.force)
    private_path = public_path.with_suffix("")
    mode = stat.S_IMODE(private_path.stat().st_mode)
    print(f"{'wrote' if created else 'kept '} {private_path} (private, mode {mode:04o}: never copy it off this machine)")
    verb = "wrote" if created else "kept "
    if args.key_type == "ecdsa-p384":
        print(f"{verb} {public_path} (public: send this file to the coordinator)")
    else:
        public_line = public_path.read_text().strip()
        print(f"{verb} {public_path} (public: send this file to every site)")
        print(f"each site's trusted-entities YAML line (sign with --key-id {args.name}):")
        print(f'{_yaml_key(args.name)}: "{public_line}"')
    return 0
