"""TLS certificates for the SuperLink and EC key pairs that authenticate SuperNodes.

`python -m fl_app.deploy.credentials OUT --hosts 10.0.0.5 link.example.org --supernodes 3`
writes:
  OUT/ca.crt, OUT/ca.key            a private certificate authority (keep ca.key offline)
  OUT/server.pem, OUT/server.key    the SuperLink's certificate, valid for every --hosts name/IP
  OUT/supernode-<i>.key / .pub      one EC P-384 key pair per SuperNode, OpenSSH format: the
                                    SuperNode keeps .key; .pub is registered with the SuperLink
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(out: Path, hosts: Sequence[str]) -> None:
    """A CA and a SuperLink server certificate signed by it, valid for `hosts`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fl_app CA"))
               .issuer_name(_name("fl_app CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)


def make_supernode_keys(out: Path, count: int, start: int = 0) -> list[tuple[Path, Path]]:
    """EC P-384 key pairs in OpenSSH format, as `flower-supernode` and `flwr supernode` read."""
    pairs = []
    for i in range(start, start + count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / f"supernode-{i}.key", out / f"supernode-{i}.pub"
        _write(private, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
        _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
        pairs.append((private, public))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the credentials to")
    parser.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                        help="IP addresses / DNS names SuperNodes use to reach the SuperLink")
    parser.add_argument("--supernodes", type=int, default=3, help="key pairs to create")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    make_tls(args.out, args.hosts)
    make_supernode_keys(args.out, args.supernodes)
    print(f"Wrote CA, SuperLink certificate for {args.hosts} and {args.supernodes} SuperNode key "
          f"pairs to {args.out.resolve()}")


if __name__ == "__main__":
    main()
