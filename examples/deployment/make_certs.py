#!/usr/bin/env python
"""Credentials for a FedMoCo deployment: a CA, the SuperLink's TLS certificate, site keys.

    python examples/deployment/make_certs.py OUT --host superlink.example.org --host 10.0.0.5 \
        --site hospital-a --site hospital-b

writes into OUT (private keys mode 0600):

``ca.crt`` / ``ca.key``          a self-signed certificate authority. ``ca.crt`` goes to every
                                 site and to whoever runs ``flwr``; ``ca.key`` stays offline.
``server.crt`` / ``server.key``  the SuperLink's TLS certificate, signed by the CA, valid for
                                 every ``--host`` (DNS names and IP addresses as SANs).
``<site>`` / ``<site>.pub``      one SuperNode authentication key pair per ``--site``: an EC
                                 P-384 key in OpenSSH format, the form Flower's
                                 ``flower-supernode --auth-supernode-private-key`` and
                                 ``flwr supernode register <site>.pub`` expect. The private key
                                 stays on the site; only the ``.pub`` travels to the operator.

Uses the ``cryptography`` package (a Flower dependency), so it runs wherever Flower does;
``openssl`` is not needed. Existing files are left alone unless ``--force``.
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


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        print(f"kept     {path} (exists; --force to replace)")
        return
    # Private keys are created 0600 from the start, not chmod-ed after the write.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
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


def make_site_key() -> tuple[bytes, bytes]:
    """(private key, public key) of one SuperNode, both OpenSSH-encoded EC P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("out", type=Path, help="folder for the credentials")
    p.add_argument("--host", action="append", default=[],
                   help="DNS name or IP address sites use to reach the SuperLink (repeat); default 127.0.0.1, localhost")
    p.add_argument("--site", action="append", default=[], help="a site that gets an authentication key pair (repeat)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    hosts = args.host or ["127.0.0.1", "localhost"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    ca_crt, ca_key_path = out / "ca.crt", out / "ca.key"
    if ca_crt.exists() and ca_key_path.exists() and not args.force:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        print(f"kept     {ca_crt} (exists; --force to replace)")
    else:
        ca_key, ca_cert = make_ca(args.days)
        _write(ca_key_path, _pem_key(ca_key), private=True, force=True)
        _write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, force=True)
    # A key and its certificate (or public key) are written together or not at all.
    if _keep(out / "server.key", out / "server.crt", force=args.force):
        server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, args.days)
        _write(out / "server.key", _pem_key(server_key), private=True, force=True)
        _write(out / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM), private=False, force=True)
    for site in args.site:
        if not site or "/" in site or site.startswith("."):
            p.error(f"--site {site!r}: use a plain name")
        if _keep(out / site, out / f"{site}.pub", force=args.force):
            private, public = make_site_key()
            _write(out / site, private, private=True, force=True)
            _write(out / f"{site}.pub", public, private=False, force=True)
    return 0


def _keep(*paths: Path, force: bool) -> bool:
    """True when the pair must be (re)generated; reports a pair that is kept."""
    if force or not any(p.exists() for p in paths):
        return True
    print(f"kept     {', '.join(str(p) for p in paths)} (exist; --force to replace)")
    return False


if __name__ == "__main__":
    sys.exit(main())
