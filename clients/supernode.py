"""A Flower SuperNode that runs only apps signed by a key the site trusts.

    python -m clients.supernode --trusted-entities /etc/fedmoco/trusted-entities.yaml \\
        [--app-signed-after 2026-11-29T14:00:00Z] [every other flower-supernode option]

``trusted-entities.yaml`` is Flower's format, one line per trusted signer::

    fedmoco-coordinator: "ssh-ed25519 AAAA... "

Why this exists: ``flower-supernode --trusted-entities`` (Flower 1.42) accepts only FABs
whose signatures the SuperLink fetched from Flower Hub; an app the coordinator sends with
``flwr run .`` never carries one, so it would be refused too. This launcher runs Flower's
own SuperNode with one change: the check it makes on every new run's FAB, before storing it
or starting any of its code, is :func:`fedmoco.appsign.verify_fab` (a signature made by
``fedmoco sign-app`` inside the FAB) instead of Flower's Hub record. A FAB that fails is
answered with Flower's "The FAB could not be verified" error reply, and its code never runs.

``--app-signed-after`` (fedmoco's, taken out before Flower sees the options) also refuses apps
signed before that time: older versions the coordinator once signed, which a SuperLink could
otherwise send again. It refuses to start without ``--trusted-entities``, and refuses to start if the Flower
functions it hooks have changed shape (a newer Flower): it never runs unchecked.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from fedmoco.appsign import parse_signed_after, verify_fab
from fedmoco.errors import ConfigError
from fedmoco.network import is_loopback_bind, loopback_bypasses_proxy, with_interpreter_bin

log = logging.getLogger("fedmoco.supernode")
_HOOKED = "flwr.supernode.start_client_internal"


def install_fab_check(signed_after: int | None = None) -> None:
    """Make Flower's SuperNode verify every FAB with :func:`fedmoco.appsign.verify_fab`,
    refusing those signed before ``signed_after`` (unix seconds) when given."""
    sci = importlib.import_module(_HOOKED)
    pull = getattr(sci, "_pull_and_store_message", None)
    if getattr(pull, "_fedmoco_checked", False):
        sci._verify_fab = _fab_check(signed_after)  # installed before: only the check's setting changes
        return
    if pull is None or not hasattr(sci, "_verify_fab"):
        raise RuntimeError(f"{_HOOKED}: this Flower release lacks the FAB check fedmoco hooks; not starting")
    params = inspect.signature(pull).parameters
    if not {"get_fab", "trusted_entities"} <= set(params):
        raise RuntimeError(f"{_HOOKED}._pull_and_store_message changed its parameters; not starting")

    def pull_and_store(*args: Any, **kwargs: Any):
        get_fab: Callable = kwargs["get_fab"]  # Flower passes it by keyword

        def get_fab_for_check(fab_hash: str, run_id: int):
            fab = get_fab(fab_hash, run_id)
            # Flower refuses a FAB without a Hub licence record before it calls
            # _verify_fab; the signature check below replaces both.
            fab.verifications = {"valid_license": "fedmoco-signature"}
            return fab

        kwargs["get_fab"] = get_fab_for_check
        return pull(*args, **kwargs)

    pull_and_store._fedmoco_checked = True  # type: ignore[attr-defined]
    sci._pull_and_store_message = pull_and_store
    sci._verify_fab = _fab_check(signed_after)


def _fab_check(signed_after: int | None) -> Callable[[Any, dict[str, str]], bool]:
    """The replacement for Flower's ``_verify_fab(fab, trusted_entities) -> bool``."""

    def verify(fab, trusted_entities: dict[str, str]) -> bool:
        try:
            reason = verify_fab(fab.content, trusted_entities, signed_after)
        except Exception as exc:  # nothing an app carries may stop the SuperNode: it is refused
            reason = f"its signature could not be checked ({type(exc).__name__})"
        if reason is not None:
            print(f"fedmoco: refused app {fab.hash_str[:12]}: {reason}", file=sys.stderr, flush=True)
            return False
        print(f"fedmoco: app {fab.hash_str[:12]} verified (signed by a trusted entity)", file=sys.stderr, flush=True)
        return True

    return verify


def _take_flag(argv: list[str], flag: str) -> tuple[list[str], list[str | None]]:
    """``(argv without flag and its values, those values)`` (``--flag V`` or ``--flag=V``, in
    order; None for a last ``--flag`` with no value): fedmoco's own options come out before
    Flower's parser, which would reject them, reads the rest."""
    rest: list[str] = []
    values: list[str | None] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == flag:
            skip = i + 1 < len(argv)
            values.append(argv[i + 1] if skip else None)
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, values


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """The values given to ``flag`` in ``argv``, in order (a last value-less ``--flag`` is Flower's to name)."""
    return [v for v in _take_flag(argv, flag)[1] if v is not None]


def flower_options(argv: list[str]):
    """``argv`` as Flower's own SuperNode parser reads it (abbreviations, repeats: the last
    wins), or None when it would refuse them (Flower then says why, once, when it starts)."""
    return _flower_options(tuple(argv))


@functools.lru_cache(maxsize=4)  # main's two checks read one command line: parsed once
def _flower_options(argv: tuple[str, ...]):
    import contextlib
    import io

    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return _parse_args_run_supernode().parse_known_args(list(argv))[0]
    except SystemExit:
        return None


def _file_given(argv: list[str], flag: str) -> Path | None:
    """The file ``flag`` names in ``argv``: the one Flower's parser picks (abbreviations,
    repeats), else the last value given, or None when there is none (Flower names a missing
    value itself)."""
    args = flower_options(argv)
    picked = getattr(args, flag.lstrip("-").replace("-", "_"), None) if args is not None else None
    given = [picked] if picked else _flag_values(argv, flag)
    return Path(given[-1]).expanduser() if given else None


def connection_problem(argv: list[str]) -> str | None:
    """Why the options in ``argv`` would expose this SuperNode, or None: ``--insecure`` (no TLS)
    to a SuperLink that is not on this machine, or its Runtime API (``--host``: no
    authentication; whoever reaches it can act as the ClientApps) on an address other than
    loopback. Read as Flower reads the options, so no spelling slips past."""
    args = flower_options(argv)
    if args is None:
        return None
    superlink = str(args.superlink).rsplit(":", 1)[0]
    if getattr(args, "insecure", False) and not is_loopback_bind(superlink):
        return (f"--insecure to the SuperLink at {args.superlink}: a site's connection must be TLS; give "
                "--root-certificates with the coordinator's CA (only a SuperLink on this machine may go without)")
    if not is_loopback_bind(str(args.host)):
        return (f"--host {args.host}: the SuperNode's Runtime API has no authentication, so it stays on 127.0.0.1 "
                "(the ClientApps it starts run on this machine)")
    return None


def trusted_entities_problem(argv: list[str]) -> str | None:
    """Why the ``--trusted-entities`` YAML in ``argv`` would not guard this SuperNode, or None.

    Flower runs its app check only when the mapping it reads is non-empty: a file holding
    ``{}`` (or only a comment) would let every app run unchecked. So the file must map at
    least one key id to a public key line (Flower then checks each key is Ed25519). The file
    is the one Flower's parser picks: a later ``--trusted-ent empty.yaml`` (an abbreviation
    Flower accepts) once replaced the file this check had read."""
    import yaml

    file = _file_given(argv, "--trusted-entities")
    if file is None:
        return None
    try:
        entities = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return f"{file}: cannot read the trusted-entities YAML ({type(exc).__name__})"
    if not isinstance(entities, dict) or not entities:
        return (f"{file}: the trusted-entities YAML names no key (key id: public key line); an empty one would "
                "let every app run unchecked")
    if not all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in entities.items()):
        return f"{file}: every trusted entity must map a key id to an OpenSSH public key line"
    # Flower loads each key after it has started, and a line that is no key ended in a
    # cryptography traceback ("Invalid data"): checked here, as Flower will (Ed25519 only).
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    for key_id, line in entities.items():
        if line != line.strip():  # Flower reads the value as it is: " ssh-ed25519 ..." ended in its traceback
            return (f"{file}: trusted entity {key_id!r} has spaces or line breaks around its key line; remove them "
                    "(the value must be exactly 'ssh-ed25519 AAAA...')")
        try:
            key = load_ssh_public_key(line.encode("utf-8"))
        except Exception:  # noqa: BLE001 cryptography raises ValueError, UnsupportedAlgorithm, ...
            key = None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return f"{file}: trusted entity {key_id!r} is not an OpenSSH Ed25519 public key line (ssh-ed25519 AAAA...)"
    return None


def private_key_problem(argv: list[str]) -> str | None:
    """Why ``--auth-supernode-private-key`` would not authenticate this SuperNode, or None.
    Flower reads it after it has started, and a missing file ended in a FileNotFoundError
    traceback; it takes an OpenSSH elliptic-curve key, as ``fedmoco keygen`` writes."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    file = _file_given(argv, "--auth-supernode-private-key")
    if file is None:
        return None
    try:
        data = file.read_bytes()
    except OSError as exc:
        return f"--auth-supernode-private-key {file}: cannot be read ({exc.strerror or type(exc).__name__})"
    try:
        key = load_ssh_private_key(data, None)
    except Exception:  # noqa: BLE001 ValueError, UnsupportedAlgorithm, TypeError (a passphrase)
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return (f"--auth-supernode-private-key {file}: not an unencrypted OpenSSH elliptic-curve private key "
                "(fedmoco keygen writes one)")
    return None


def main(argv: list[str] | None = None) -> int:
    """Start Flower's SuperNode with the fedmoco FAB check; exit 2 without --trusted-entities."""
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--trusted-entities" or a.startswith("--trusted-entities=") for a in argv) \
            and not {"-h", "--help", "-V", "--version"} & set(argv):
        print("clients.supernode: error: --trusted-entities YAML is required (the coordinator's app-signing "
              "public key); without it use flower-supernode", file=sys.stderr)
        return 2
    argv, after = _take_flag(argv, "--app-signed-after")  # ours: Flower's parser does not know it
    problem = trusted_entities_problem(argv) or private_key_problem(argv) or connection_problem(argv)
    if problem is not None:
        print(f"clients.supernode: error: {problem}", file=sys.stderr)
        return 2
    try:
        signed_after = parse_signed_after(after[-1] or "") if after else None
    except ConfigError as exc:
        print(f"clients.supernode: error: {exc}", file=sys.stderr)
        return 2
    try:
        install_fab_check(signed_after)
    except RuntimeError as exc:
        print(f"clients.supernode: error: {exc}", file=sys.stderr)
        return 2
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # The SuperNode and each ClientApp it starts talk over 127.0.0.1: never through the site's
    # web proxy, which stays in place for the connection to the SuperLink.
    os.environ.update(with_interpreter_bin(loopback_bypasses_proxy(os.environ, also=_flag_values(argv, "--host"))))
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
