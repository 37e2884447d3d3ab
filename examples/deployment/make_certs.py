#!/usr/bin/env python
"""TLS credentials of a FedMoCo SuperLink: a CA and the SuperLink's certificate.

    python examples/deployment/make_certs.py OUT --host superlink.example.org --host 10.0.0.5

writes into OUT (private keys mode 0600, written atomically):

``ca.crt`` / ``ca.key``          a self-signed certificate authority. ``ca.crt`` goes to every
                                 site and to whoever runs ``flwr``; ``ca.key`` stays offline.
``server.crt`` / ``server.key``  the SuperLink's TLS certificate, signed by the CA, valid for
                                 every ``--host`` (DNS names and IP addresses as SANs)
                                 and for 127.0.0.1 / localhost (the coordinator-only port).

It makes no site keys: each site makes its own authentication key pair on its own machine
(``fedmoco keygen``) and sends only the public half, so no private key ever travels.

Uses the ``cryptography`` package (a Flower dependency), so it runs wherever Flower does;
``openssl`` is not needed. An existing complete pair is kept unless ``--force``; half a pair
(a key without its certificate, or the reverse) is an error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmoco.errors import ConfigError
from fedmoco.keys import PUBLIC_MODE, write_secret


def _write(path: Path, data: bytes, *, private: bool) -> None:
    write_secret(path, data, 0o600 if private else PUBLIC_MODE)
    print(f"wrote    {path}")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmoco federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(days: int) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("fedmoco CA")).issuer_name(_name("fedmoco CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str],
                     days: int) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the credentials")
    p.add_argument("--host", action="append", default=[],
                   help="DNS name or IP address sites use to reach the SuperLink (repeat); 127.0.0.1 and localhost are always added")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    if not 1 <= args.days <= 36500:  # 0 or less made certificates that expired as they were written
        p.error(f"--days {args.days}: must be 1-36500")
    # 127.0.0.1/localhost always: the coordinator's flwr and the SuperLink's own ServerApp
    # process reach the Control and Runtime APIs over loopback, and verify this certificate
    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        keep_ca = _keep(out / "ca.key", out / "ca.crt", force=args.force)
        # a new CA invalidates the old server certificate
        keep_server = keep_ca and _keep(out / "server.key", out / "server.crt", force=args.force)
    except ConfigError as exc:
        print(f"make_certs.py: error: {exc}", file=sys.stderr)
        return 2
    if keep_ca:
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    else:
        ca_key, ca_cert = make_ca(args.days)
        _write(out / "ca.key", _pem_key(ca_key), private=True)
        _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    if not keep_server:
        server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, args.days)
        _write(out / "server.key", _pem_key(server_key), private=True)
        _write(out / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return 0


def _keep(key: Path, cert: Path, *, force: bool) -> bool:
    """True if a complete pair is there and kept (its key set to 0600); False if it must be
    made; ConfigError for half a pair."""
    if force or not (key.exists() or cert.exists()):
        return False
    if not (key.exists() and cert.exists()):
        present, missing = (key, cert) if key.exists() else (cert, key)
        raise ConfigError(f"{missing}: missing, but {present} exists (half a pair); restore it, or run with --force")
    os.chmod(key, 0o600)
    print(f"kept     {key}, {cert} (exist; --force to replace)")
    return True


if __name__ == "__main__":
    sys.exit(main())
