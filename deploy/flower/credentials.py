"""Make the credentials of a Flower deployment: a CA, the SuperLink's TLS certificate, and one
authentication key pair per SuperNode.

    python deploy/flower/credentials.py OUT_DIR --host superlink.example.org --host 10.0.0.5 --supernodes 2

writes, under OUT_DIR:

* ``ca.crt``: the root certificate; SuperNodes (``--root-certificates``) and ``flwr`` (the
  connection's ``root-certificates``) verify the SuperLink with it;
* ``server.pem`` / ``server.key``: the SuperLink's certificate (valid for every ``--host``,
  as DNS name or IP address) and key (``--ssl-certfile`` / ``--ssl-keyfile``, ``--ssl-ca-certfile ca.crt``);
* ``supernode-<i>`` / ``supernode-<i>.pub``: an ECDSA (NIST P-384) key pair in OpenSSH format per
  SuperNode; the SuperNode signs with the private key (``--auth-supernode-private-key``), the
  SuperLink (``--enable-supernode-auth``) admits it once ``flwr supernode register`` gave it the
  public key.

A self-made CA suits a private federation; behind a public name, use a certificate from a public
CA instead and give SuperNodes no ``--root-certificates``. Private keys are written mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_credentials"]

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmerge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_credentials(out: Path, hosts: list[str], supernodes: int) -> dict[str, Path]:
    """Write the files listed in the module docstring; returns their paths by name."""
    if not hosts:
        raise ValueError("give at least one --host the SuperLink is reached at")
    if supernodes < 0:
        raise ValueError(f"--supernodes must be >= 0, got {supernodes}")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmerge federation CA"))
        .issuer_name(_name("fedmerge federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    paths = {
        "ca": out / "ca.crt",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    pem = serialization.Encoding.PEM
    _write(paths["ca"], ca_cert.public_bytes(pem))
    _write(paths["server_cert"], server_cert.public_bytes(pem))
    _write(
        paths["server_key"],
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private=True,
    )
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        paths[f"supernode_{i}"] = out / f"supernode-{i}"
        paths[f"supernode_{i}_pub"] = out / f"supernode-{i}.pub"
        _write(
            paths[f"supernode_{i}"],
            key.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            private=True,
        )
        _write(
            paths[f"supernode_{i}_pub"],
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + b"\n",
        )
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the files into")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address SuperNodes and flwr reach the SuperLink at (repeatable)",
    )
    parser.add_argument(
        "--supernodes", type=int, default=2, help="how many SuperNode key pairs to make"
    )
    args = parser.parse_args(argv)
    try:
        paths = make_credentials(args.out, args.host, args.supernodes)
    except ValueError as err:
        parser.error(str(err))
    for name, path in paths.items():
        print(f"{name:>16}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
