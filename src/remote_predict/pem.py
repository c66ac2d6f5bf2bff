"""Loading a certificate chain and its key, given as PEM text, into an `ssl.SSLContext`.

TF Serving's TLS configs carry PEM text, and gRPC takes it as bytes; Python's `ssl` module loads a
chain from files only. Both ends of the tcp transport (the op's client, the server's --tcp_port) go
through here: the PEMs are written to a private temporary directory (mode 0600), loaded, and removed.
"""

from __future__ import annotations

import os
import ssl
import tempfile


def load_cert_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    """`context.load_cert_chain` for PEM text; ssl.SSLError for a bad certificate or key."""
    with tempfile.TemporaryDirectory() as scratch:
        cert_path, key_path = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
        for path, pem in ((cert_path, cert), (key_path, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(pem)
        context.load_cert_chain(cert_path, key_path)
