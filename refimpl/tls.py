"""``refimpl serve --tls``: HTTPS and HTTP/2 over TLS on a laptop, without a real certificate.

Strategy
--------
Browsers and most HTTP clients speak HTTP/2 only over TLS, where the two
sides agree on it during the handshake (ALPN, RFC 7301: the client offers
``h2`` and ``http/1.1``, the server picks).  hypercorn does that by itself
once it has a certificate and its key.  A teaching server on 127.0.0.1 has
no certificate a public authority would sign, so ``--tls`` makes a
throw-away certificate authority with ``trustme`` (the library the Python
HTTP projects test TLS with), issues a certificate for ``127.0.0.1`` and
``localhost`` from it, and writes three files into a fresh temporary folder:
the CA's certificate (what a client must trust), and the server's
certificate chain and key (what hypercorn serves).  The CA exists only in
that folder; nothing is installed into the system's trust store.  With a
certificate of your own, ``--certfile`` and ``--keyfile`` take its place.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalTLS:
    ca: Path  # trust this: curl --cacert, httpx verify=, ssl.create_default_context(cafile=)
    certfile: Path  # the server's certificate chain
    keyfile: Path  # and its private key


def local_certificate(folder: Path | None = None) -> LocalTLS:
    """A new CA and a certificate for 127.0.0.1 and localhost, as files."""
    import trustme  # only --tls needs it

    folder = Path(folder or tempfile.mkdtemp(prefix="refimpl-tls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls = LocalTLS(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(tls.ca))
    cert.private_key_pem.write_to_path(str(tls.keyfile))
    with open(tls.certfile, "wb") as f:  # the chain: the server's certificate, then its issuers
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return tls
