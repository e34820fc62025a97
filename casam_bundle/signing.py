"""Ed25519 signatures of task packages, with the ``cryptography`` library.

A site signs the exact bytes of its package's index (``package.json``), which lists the
sha256 of every file, so one signature covers the whole package. A coordinator trusts a
folder of public keys (``*.pub``, one per site); a key is named by its id, the first 16
hex digits of the sha256 of its raw 32 bytes. ``cryptography`` is imported only here and
only when signing or verifying, so reading bundles needs no crypto library.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from casam_core.optional import optional_import
from casam_core.files import PathLike
from casam_bundle.errors import BundleError
from casam_core.ownership import refuse_existing
from casam_core.files import atomic_write_bytes

ALGORITHM = "ed25519"
PUBLIC_SUFFIX = ".pub"


def _crypto():
    feature = "signing"
    ed25519 = optional_import("cryptography.hazmat.primitives.asymmetric.ed25519", "train", feature, BundleError)
    serialization = optional_import("cryptography.hazmat.primitives.serialization", "train", feature, BundleError)
    exceptions = optional_import("cryptography.exceptions", "train", feature, BundleError)
    return ed25519, serialization, exceptions.InvalidSignature


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw(public_key: Any) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_keypair(out: PathLike, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a private key to ``out`` (PEM, mode 0600) and its public key to ``out.pub``.

    Existing key files are replaced only with ``overwrite`` (the rule every writer shares)."""
    ed25519, serialization, _ = _crypto()
    private_path, public_path = Path(out), Path(f"{out}{PUBLIC_SUFFIX}")
    for path in (private_path, public_path):
        refuse_existing(path, overwrite, error=BundleError, what="a key: replacing it orphans what it signed")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(private_path, private_pem)
    os.chmod(private_path, 0o600)
    atomic_write_bytes(public_path, public_pem)
    return private_path, public_path, key_id(_raw(key.public_key()))


def sign(private_key_path: PathLike, data: bytes) -> dict[str, str]:
    """The signature record of ``data`` (``signature.json`` of a package)."""
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{private_key_path} is not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{private_key_path} is not an Ed25519 key; make one with casam-train keygen")
    return {"algorithm": ALGORITHM, "key_id": key_id(_raw(key.public_key())),
            "signature": base64.b64encode(key.sign(data)).decode("ascii")}


def load_trusted(folder: PathLike) -> dict[str, Any]:
    """The public keys in ``folder`` (``*.pub``) by key id."""
    ed25519, serialization, _ = _crypto()
    root = Path(folder)
    if not root.is_dir():
        raise BundleError(f"trust folder {root} does not exist")
    keys: dict[str, Any] = {}
    for path in sorted(root.glob(f"*{PUBLIC_SUFFIX}")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"trusted key {path} is not a PEM public key ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BundleError(f"trusted key {path} is not an Ed25519 key")
        keys[key_id(_raw(key))] = key
    if not keys:
        raise BundleError(f"trust folder {root} holds no public keys (*{PUBLIC_SUFFIX})")
    return keys


def verify(signature: Mapping[str, Any], data: bytes, trusted: Mapping[str, Any], where: str) -> str:
    """The id of the trusted key that signed ``data``; ``BundleError`` for anything else."""
    _, _, invalid = _crypto()
    if signature.get("algorithm") != ALGORITHM or not isinstance(signature.get("signature"), str):
        raise BundleError(f"{where}: signature.json is not an {ALGORITHM} signature")
    kid = signature.get("key_id")
    if kid not in trusted:
        raise BundleError(f"{where} is signed by key {str(kid)[:16]!r}, which is not in the trust folder")
    try:
        trusted[kid].verify(base64.b64decode(signature["signature"], validate=True), data)
    except (invalid, ValueError) as exc:
        raise BundleError(f"{where}: the signature does not match the package (tampered, or not signed by {kid})") from exc
    return str(kid)
