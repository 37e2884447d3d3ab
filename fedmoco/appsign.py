"""Coordinator-signed Flower apps: ``fedmoco sign-app`` and the check a site's SuperNode runs.

Why not Flower's own signing: in Flower 1.42 ``flower-supernode --trusted-entities`` only
accepts FABs whose signatures the SuperLink fetched from Flower Hub (``flwr app review``
uploads them there); for a FAB sent with ``flwr run .`` the SuperLink records no signature,
so a SuperNode with ``--trusted-entities`` refuses every private app. Here the signature
travels inside the FAB instead, as ``fedmoco-app-signature.json``, in the same record shape
Flower uses (``{key_id: {"signature": base64url, "signed_at": unix seconds}}``), Ed25519
over ``signed_at`` (8 bytes big-endian) + ``sha256(manifest)``, with the same trusted-entities
YAML (``key_id: "ssh-ed25519 AAAA..."``) as Flower.

The manifest is computed from the FAB's bytes, never taken from it: every zip entry except
the signature file and Flower's ``.info/CONTENT`` (which lists the signature file itself),
sorted, one ``name NUL sha256`` line each. Adding, removing, renaming or changing any
file therefore breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedmoco.errors import ConfigError

SIGNATURE_FILE = "fedmoco-app-signature.json"
_UNSIGNED_ENTRIES = frozenset({SIGNATURE_FILE, ".info/CONTENT"})


#: Most bytes a FAB may unpack to (its files together). An app is code and a pyproject.toml: a
#: few MB. A 306 KB FAB of zeros unpacked to 300 MiB in a site's memory before the check.
MAX_FAB_UNPACKED = 256 * 2**20
#: Most bytes the signature file may unpack to (a few hundred per signer).
MAX_SIGNATURE_BYTES = 2**20


def fab_manifest_digest(fab: bytes) -> tuple[bytes, int]:
    """``(sha256 of the canonical manifest, number of files it covers)`` of FAB bytes.

    Each file is hashed as it unpacks, 1 MiB at a time, and ValueError is raised once the
    files together pass :data:`MAX_FAB_UNPACKED`: a compressed filler can make no site hold
    more than a chunk of it, nor unpack more than the cap."""
    total = 0
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        names = [n for n in zf.namelist() if n not in _UNSIGNED_ENTRIES]
        if len(set(names)) != len(names):
            raise ValueError("the FAB holds two entries with the same name")
        lines = []
        for n in names:
            h = hashlib.sha256()
            with zf.open(n) as fh:
                while chunk := fh.read(2**20):
                    total += len(chunk)
                    if total > MAX_FAB_UNPACKED:
                        raise ValueError(f"the FAB unpacks to more than {MAX_FAB_UNPACKED >> 20} MiB")
                    h.update(chunk)
            lines.append(f"{n}\0{h.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).digest(), len(lines)


def _read_capped(zf: zipfile.ZipFile, name: str, cap: int) -> bytes:
    with zf.open(name) as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{name} unpacks to more than {cap} bytes")
    return data


def _message(digest: bytes, signed_at: int) -> bytes:
    # Flower's create_message_to_sign layout: timestamp (8 bytes big-endian) + digest
    return signed_at.to_bytes(8, "big") + digest


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable OpenSSH private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key; make one with: fedmoco keygen --type ed25519")
    return key


def build_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr run APP_DIR`` sends, built by Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(app_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{app_dir}: cannot build the Flower app ({exc})") from None


def copy_app_files(app_dir: Path, dest: Path) -> Path:
    """Write the files ``flwr run APP_DIR`` would send (without any signature) into ``dest``:
    a copy to sign and run while ``app_dir`` stays unchanged."""
    with zipfile.ZipFile(io.BytesIO(build_fab(app_dir))) as zf:
        for name in zf.namelist():
            if name in _UNSIGNED_ENTRIES or name.startswith(".info/"):
                continue
            target = (dest / name).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ConfigError(f"{app_dir}: the app holds a path outside its folder: {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return dest


def sign_app(app_dir: Path, key_path: Path, key_id: str) -> tuple[Path, int]:
    """Write ``APP_DIR/fedmoco-app-signature.json`` signing the FAB of ``app_dir``.

    Returns ``(signature file, number of files signed)``. Re-run it after every change to
    the app: a FAB built from changed files no longer verifies.
    """
    if not key_id or any(c.isspace() for c in key_id) or ":" in key_id:
        raise ConfigError(f"--key-id {key_id!r}: use one word without spaces or colons")
    key = _load_signing_key(key_path)
    digest, n_files = fab_manifest_digest(build_fab(app_dir))
    signed_at = int(time.time())
    record = {key_id: {"signature": _b64url(key.sign(_message(digest, signed_at))), "signed_at": signed_at}}
    out = app_dir / SIGNATURE_FILE
    out.write_text(json.dumps(record, indent=2) + "\n")
    # the signature file itself must travel in the FAB (not excluded by .gitignore or rules)
    with zipfile.ZipFile(io.BytesIO(build_fab(app_dir))) as zf:
        if SIGNATURE_FILE not in zf.namelist():
            raise ConfigError(f"{out}: written, but the app's FAB leaves it out (.gitignore?); sites would refuse it")
    return out, n_files


def verify_fab(fab: bytes, trusted: dict[str, str], signed_after: int | None = None) -> str | None:
    """None if a key in ``trusted`` (key id -> OpenSSH Ed25519 public line) signed ``fab``,
    at or after ``signed_after`` (unix seconds) when given; otherwise the reason it is refused
    (one line).

    ``signed_after`` is a site's defence against replay: a SuperLink (or anyone holding an old
    FAB) could send an older app the coordinator once signed, say one whose bug a later
    version fixed; its signature still verifies, but its ``signed_at`` is older."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            if SIGNATURE_FILE not in zf.namelist():
                return f"the app is not signed (no {SIGNATURE_FILE}); the coordinator signs it with fedmoco sign-app"
            records = json.loads(_read_capped(zf, SIGNATURE_FILE, MAX_SIGNATURE_BYTES))
    except (zipfile.BadZipFile, ValueError, UnicodeDecodeError, RecursionError) as exc:
        return f"the app is not a readable FAB or signature file ({type(exc).__name__}: {str(exc)[:200]})"
    if not isinstance(records, dict):
        return f"{SIGNATURE_FILE} is not a JSON object"
    signers = [k for k in records if k in trusted]
    if not signers:  # refused before any other file is unpacked (a stranger's app costs nothing)
        return f"signed by {sorted(records)!r}, none of which is a trusted entity ({sorted(trusted)!r})"
    try:
        digest, _ = fab_manifest_digest(fab)
    except (zipfile.BadZipFile, ValueError, RecursionError) as exc:
        return f"the app is not a readable FAB ({type(exc).__name__}: {str(exc)[:200]})"
    stale = None
    for key_id in signers:
        rec = records[key_id]
        try:
            signed_at = rec["signed_at"]
            if isinstance(signed_at, bool) or not isinstance(signed_at, int) or not 0 <= signed_at < 2**63:
                continue  # what sign_app writes: whole seconds since 1970, 8 bytes in the message
            public = serialization.load_ssh_public_key(trusted[key_id].encode())
            signature = base64.urlsafe_b64decode(rec["signature"] + "=" * (-len(rec["signature"]) % 4))
            if not isinstance(public, ed25519.Ed25519PublicKey):
                continue
            public.verify(signature, _message(digest, signed_at))
        except (InvalidSignature, KeyError, TypeError, ValueError, OverflowError):
            continue
        if signed_after is not None and signed_at < signed_after:
            # the signed time is covered by the signature, so an older app cannot pass as new
            stale = (f"signed by {key_id} at {utc_text(signed_at)}, before this site's --app-signed-after "
                     f"{utc_text(signed_after)}: an older version of the app; the coordinator signs the current one")
            continue
        return None
    if stale is not None:
        return stale
    return f"the signature of {', '.join(signers)} does not match the app's files (changed after signing?)"


def utc_text(unix_s: int) -> str:
    """``unix_s`` as ``YYYY-MM-DDTHH:MM:SSZ`` (as a number where no calendar reaches it)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
    except (OverflowError, OSError, ValueError):
        return f"{unix_s} (unix seconds)"


def parse_signed_after(text: str) -> int:
    """A site's ``--app-signed-after`` value as unix seconds: an ISO 8601 date or date-time
    (``2026-11-29``, ``2026-11-29T14:00:00Z``; without a zone it is UTC), or unix seconds.
    Raises ConfigError with one line when it is neither, or lies in the future (which would
    refuse every app, the current one included)."""
    from datetime import datetime, timezone

    text = text.strip()
    try:
        # Eight digits are an ISO 8601 basic date (20261129), not unix seconds in August 1970,
        # which turned the replay protection off without a word (found by an audit).
        value = int(text) if text.isdigit() and len(text) != 8 else None
        if value is None:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            value = int(moment.timestamp())
    except (ValueError, OverflowError, OSError):
        raise ConfigError(f"--app-signed-after {text!r}: not a date (2026-11-29, 2026-11-29T14:00:00Z) "
                          "nor unix seconds") from None
    if value > time.time() + 86400:
        raise ConfigError(f"--app-signed-after {text!r}: lies in the future, so every app would be refused; "
                          "give the time the coordinator signed the version to run (fedmoco sign-app prints it)")
    return value


def add_sign_app_parser(sub):
    """Register ``fedmoco sign-app`` on an argparse sub-parser collection."""
    p = sub.add_parser("sign-app", help="sign the Flower app (coordinator) so sites' SuperNodes run it",
                       description=__doc__.splitlines()[0])
    p.add_argument("app", type=Path, nargs="?", default=Path("."), help="the app folder given to flwr run (default: .)")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (fedmoco keygen --type ed25519)")
    p.add_argument("--key-id", required=True, help="the name sites give this key in their trusted-entities YAML")
    return p


def cmd_sign_app(args) -> int:
    """``fedmoco sign-app``: sign, then say what the sites need."""
    out, n_files = sign_app(args.app, args.key, args.key_id)
    signed_at = json.loads(out.read_text())[args.key_id]["signed_at"]
    print(f"wrote {out} ({n_files} files signed as {args.key_id!r} at {utc_text(signed_at)}); run flwr run "
          f"{args.app} now, and sign again after any change. To refuse older signed versions, sites start "
          f"their SuperNode with --app-signed-after {utc_text(signed_at)}")
    return 0
