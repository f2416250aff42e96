"""A throwaway certificate authority for the tests' HTTPS release server.

A release's SHA256SUM is only trusted over https, and there is no internet here, so
the tests serve it from 127.0.0.1 over TLS with a certificate of their own CA. The
client side trusts that CA only through ``$EDGEBUNDLE_EXTRA_CA_FILE`` (which adds a
CA, never turns verification off), set explicitly by the tests that need it. Made
with the openssl command line (argv lists, no shell): no Python crypto package is
needed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class TestCA:
    """A CA certificate (what clients trust) and a server certificate it signed."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_test_ca(directory: Path, name: str = "edgebundle test CA") -> TestCA:
    """A new CA and a certificate for 127.0.0.1/localhost signed by it, valid 2 days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(_SERVER_EXTENSIONS, encoding="ascii")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    _openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )
    return TestCA(ca_cert=ca_cert, server_cert=cert, server_key=key)
