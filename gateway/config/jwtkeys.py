"""What key each JWT algorithm verifies with, and whether a configured key fits: checked when
routes.yaml is loaded (RFC 7518 §3, RFC 8037 §3.1), and used again by the verifier."""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2
MIN_RSA_BITS: Final = 2048

# The key type each algorithm verifies with (RFC 7518 §3.1, RFC 8037 §3.1).
ALGORITHM_KEYS: Final = {
    "HS256": "hmac", "HS384": "hmac", "HS512": "hmac",
    "RS256": "rsa", "RS384": "rsa", "RS512": "rsa", "PS256": "rsa",
    "ES256": "ec-p256", "ES384": "ec-p384",
    "EdDSA": "okp",
}  # fmt: skip

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


def key_kind(key: PublicKey) -> str:
    """The ALGORITHM_KEYS value a public key can verify, or "" for one no algorithm fits."""
    match key:
        case rsa.RSAPublicKey():
            return "rsa"
        case ec.EllipticCurvePublicKey():
            return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, "")
        case ed25519.Ed25519PublicKey() | ed448.Ed448PublicKey():
            return "okp"
    return ""


def load_public_key(pem: bytes) -> PublicKey:
    """A PEM public key or certificate; ValueError when it is neither (a private key, say)."""
    if b"-----BEGIN CERTIFICATE-----" in pem:
        key: object = x509.load_pem_x509_certificate(pem).public_key()
    else:
        key = load_pem_public_key(pem)
    if not isinstance(key, PublicKey):
        raise ValueError("unsupported key type")
    return key


def public_key_problem(pem: bytes, algorithms: frozenset[str]) -> str | None:
    """Why a public_key_file cannot verify `algorithms`, or None. Never quotes the key."""
    try:
        key = load_public_key(pem)
    except ValueError:
        return "public_key_file is not a PEM public key or certificate"
    kind = key_kind(key)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"public_key_file holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS}"
    misfits = sorted(a for a in algorithms if ALGORITHM_KEYS[a] != kind)
    if misfits:
        return f"public_key_file holds a key that cannot verify {', '.join(misfits)}"
    return None
