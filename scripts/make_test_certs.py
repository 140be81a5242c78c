"""Make the files a Flower deployment over TLS needs, for tests and first trials (not for production:
the CA's key sits beside the certificates it signs).

    python scripts/make_test_certs.py certs                          # 127.0.0.1 and localhost
    python scripts/make_test_certs.py certs --host 10.0.0.1 --host superlink.lab --nodes 3

writes into the folder:

- `ca.crt`, `ca.key`: a self-signed certificate authority (`--root-certificates` of every SuperNode and
  of `flwr`'s config, `--ssl-ca-certfile` of the SuperLink);
- `server.crt`, `server.key`: the SuperLink's certificate, signed by the CA, valid for every `--host`
  (IP addresses and DNS names; 127.0.0.1 and localhost always) (`--ssl-certfile`, `--ssl-keyfile`);
- with `--nodes N`, `node0` ... : one SuperNode authentication key pair each (ECDSA P-384, OpenSSH
  format: `nodeK` is `flower-supernode --auth-supernode-private-key`, `nodeK.pub` is what
  `flwr supernode register` tells a SuperLink started with `--enable-supernode-auth`).

The private keys (`ca.key`, `server.key`, `nodeK`) are created with mode 0600 (readable by their owner
alone), the certificates and public keys with 0644.

Uses `cryptography`, which flwr depends on. Refuses to overwrite existing files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certs(folder: Path, hosts: list[str], nodes: int = 0) -> dict[str, Path]:
    """Write the CA, the SuperLink's certificate for `hosts` and `nodes` SuperNode key pairs into
    `folder`; returns the paths by name. FileExistsError if any of them exists."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "ca.key", "server.crt", "server.key"]
    names += [f"node{k}{ext}" for k in range(nodes) for ext in ("", ".pub")]
    paths = {name: folder / name for name in names}
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash:
        raise FileExistsError(f"refusing to overwrite {', '.join(clash)}")

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("hlora test CA"))
        .issuer_name(_name("hlora test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths["ca.crt"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["ca.key"], _pem_key(ca_key), 0o600)
    _write(paths["server.crt"], server.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["server.key"], _pem_key(server_key), 0o600)
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        _write(paths[f"node{k}"], private, 0o600)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(paths[f"node{k}.pub"], public, 0o644)
    return paths


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` (narrowed further by the umask) and write `data`: a private key is
    never readable by others, not even between its creation and a later chmod. O_EXCL: a file that
    appeared since the check (or a symlink planted there) is not written through."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the files (created if missing)")
    parser.add_argument(
        "--host", action="append", default=[], help="an IP address or DNS name the SuperLink is reached at"
    )
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode authentication key pairs to make")
    args = parser.parse_args(argv)
    try:
        paths = make_certs(args.folder, args.host, args.nodes)
    except FileExistsError as e:
        print(f"make_test_certs: {e}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
