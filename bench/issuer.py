"""A stand-in identity hub for ``gateway-full``: one ES256 key per benchmark, its discovery
document and JWK Set as static files, and one access token for wrk to send.

The upstream nginx serves the files (``location /issuer/`` in upstream.conf), so the gateway
finds its keys exactly as it finds the hub's: ``--issuer URL``, OpenID Connect Discovery at
``URL/.well-known/openid-configuration``, then ``jwks_uri`` (docs/adr/0006). Nothing is signed
during the measurement: every request carries the same token, verified once and then served
from the gateway's verified-token cache, as a client that keeps its token is.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

# Where upstream.conf serves the files from, under the work directory and under the URL.
ISSUER_PATH = "issuer"
DISCOVERY = ".well-known/openid-configuration"
JWKS = "jwks.json"

AUDIENCE = "https://gateway.bench.cityplane.test"
SCOPE = "bench:read"
# docs/trust-levels.md: level 2 is pwd + a second factor; the route asks for minTrustLevel 2.
ACR = "urn:cityplane:loa:2"
TOKEN_LIFETIME = 3600  # one hour: far longer than `python -m bench` runs
KID = "bench-1"


@dataclass(frozen=True)
class BenchIssuer:
    """The issuer's URL, what it publishes, and the one token signed with its key."""

    url: str
    audience: str
    scope: str
    discovery: dict[str, Any]
    jwks: dict[str, Any]
    token: str

    @property
    def authorization(self) -> str:
        """The Authorization header's value (RFC 6750 §2.1)."""
        return f"Bearer {self.token}"

    def documents(self) -> dict[str, dict[str, Any]]:
        """Path under the issuer URL -> JSON document."""
        return {DISCOVERY: self.discovery, JWKS: self.jwks}

    def write(self, workdir: Path) -> None:
        """The files upstream.conf serves at ``/issuer/...`` (``root`` is the work directory)."""
        root = workdir / ISSUER_PATH
        for path, document in self.documents().items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(document))
        # Run as root, nginx reads files as its worker's user (nobody), which mkdtemp's 0700
        # keeps out: let it through the work directory (not list it) to the public documents,
        # whatever the umask.
        workdir.chmod(0o711)
        for entry in (root, *root.rglob("*")):
            entry.chmod(0o755 if entry.is_dir() else 0o644)


def issuer_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/{ISSUER_PATH}"


def create_issuer(url: str, *, now: float | None = None) -> BenchIssuer:
    """A fresh P-256 key, the documents that publish it, and an RFC 9068 access token."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "ES256"}]}
    discovery = {
        # OpenID Connect Discovery 1.0 §4.3: identical to the URL the document was fetched for.
        "issuer": url,
        "jwks_uri": f"{url}/{JWKS}",
        "id_token_signing_alg_values_supported": ["ES256"],
    }
    issued = int(time.time() if now is None else now)
    # RFC 9068 §2.2 (iss, exp, aud, sub, client_id, iat, jti) plus the claims the route checks:
    # scope (§2.2.3) and acr (§2.2.1, a person's trust level).
    claims = {
        "iss": url,
        "aud": AUDIENCE,
        "sub": "bench-citizen",
        "client_id": "bench-client",
        "exp": issued + TOKEN_LIFETIME,
        "iat": issued,
        "jti": uuid.uuid4().hex,
        "acr": ACR,
        "scope": SCOPE,
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID, "typ": "at+jwt"})
    return BenchIssuer(url, AUDIENCE, SCOPE, discovery, jwks, token)
