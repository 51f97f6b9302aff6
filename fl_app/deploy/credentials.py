"""TLS certificates for the SuperLink and the SuperNodes, and EC key pairs that authenticate
SuperNodes.

`python -m fl_app.deploy.credentials OUT --hosts 10.0.0.5 link.example.org --supernodes 3`
writes:
  OUT/ca.crt, OUT/ca.key            a private certificate authority (keep ca.key offline)
  OUT/server.pem, OUT/server.key    the SuperLink's certificate, valid for every --hosts name/IP
                                    and for loopback (where its Control and Runtime APIs listen)
  OUT/supernode-<i>.key / .pub      one EC P-384 key pair per SuperNode, OpenSSH format: the
                                    SuperNode keeps .key; .pub is registered with the SuperLink
  OUT/supernode-<i>-runtime.pem / .key
                                    SuperNode i's own certificate for its Runtime API (the port
                                    its fl-app-executor dials), valid for --supernode-hosts
Every private key is created 0600: no other account can read it at any moment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl_app.run_files import write_private

VALID_DAYS = 365
LOOPBACK = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def _issue(out: Path, stem: str, hosts: Sequence[str], ca_cert: x509.Certificate,
           ca_key: ec.EllipticCurvePrivateKey) -> None:
    """`stem`.pem and `stem`.key: a server certificate for `hosts`, signed by the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    hosts = list(dict.fromkeys(hosts))
    cert = (_validity(x509.CertificateBuilder()).subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(out / f"{stem}.key", _pem_key(key))


def make_tls(out: Path, hosts: Sequence[str]) -> None:
    """A CA and a SuperLink server certificate signed by it, valid for `hosts` and loopback."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (_validity(x509.CertificateBuilder()).subject_name(_name("fl_app CA"))
               .issuer_name(_name("fl_app CA")).public_key(ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(out / "ca.key", _pem_key(ca_key))
    _issue(out, "server", [*hosts, *LOOPBACK], ca_cert, ca_key)


def make_supernode_tls(out: Path, indices: Sequence[int],
                       hosts: Sequence[str] = LOOPBACK) -> list[tuple[Path, Path]]:
    """Per SuperNode, a Runtime API certificate of its own, signed by the CA in `out`.

    A SuperNode never holds the SuperLink's key: a SuperNode machine that is compromised
    cannot pose as the SuperLink to the others. `hosts`: the names/IPs its executor dials.
    """
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / 'ca.key'} is not the EC key this tool writes")
    pairs = []
    for i in indices:
        _issue(out, f"supernode-{i}-runtime", hosts, ca_cert, ca_key)
        pairs.append((out / f"supernode-{i}-runtime.pem", out / f"supernode-{i}-runtime.key"))
    return pairs


def make_supernode_keys(out: Path, count: int, start: int = 0) -> list[tuple[Path, Path]]:
    """EC P-384 key pairs in OpenSSH format, as `flower-supernode` and `flwr supernode` read."""
    pairs = []
    for i in range(start, start + count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / f"supernode-{i}.key", out / f"supernode-{i}.pub"
        write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
        pairs.append((private, public))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the credentials to")
    parser.add_argument("--hosts", nargs="+", default=list(LOOPBACK),
                        help="IP addresses / DNS names SuperNodes use to reach the SuperLink")
    parser.add_argument("--supernodes", type=int, default=3,
                        help="SuperNodes to create a key pair and a Runtime API certificate for")
    parser.add_argument("--supernode-hosts", nargs="+", default=list(LOOPBACK),
                        help="names/IPs each SuperNode's executor dials its Runtime API at "
                             "(default: loopback, the executor on the SuperNode's machine)")
    args = parser.parse_args(argv)
    args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_tls(args.out, args.hosts)
    make_supernode_keys(args.out, args.supernodes)
    make_supernode_tls(args.out, range(args.supernodes), args.supernode_hosts)
    print(f"Wrote CA, SuperLink certificate for {args.hosts}, and {args.supernodes} SuperNode "
          f"key pairs and Runtime API certificates to {args.out.resolve()}")


if __name__ == "__main__":
    main()
