"""Signed model trees: OpenSSF model signing (``model_signing``), key-based and offline.

The signature covers every file of the tree, the manifest included (sha256 per file), and ships beside
the manifest as ``model.sig``, a Sigstore bundle that ``model_signing verify key`` accepts as it is. The
build signs with a private key that arrives as a build secret; a reader verifies with the public key when
one is configured (``public_key=`` or $MODELBAKE_SIGNING_PUBLIC_KEY) and then refuses a tree whose
signature is missing or fails. ``model_signing`` (about 70 MB with its dependencies, 0.65 s to import) is
imported only when a signature is made or checked: the runtime image carries it only when built with
MODEL_SIGNING=1.

    python -m modelbake.signature sign TREE --private-key KEY.pem
    python -m modelbake.signature verify TREE --public-key PUB.pem
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from modelbake.errors import first_line
from modelbake.manifest import PUBLIC_KEY_ENV, ManifestError
from modelbake.spec import SIGNATURE_NAME


class SigningError(ManifestError):
    """A signature cannot be made or does not verify, or a key is unusable. A ManifestError too: every
    reader that refuses an unchecked tree refuses an unsigned or altered one the same way."""


INSTALL_HINT = "pip install -r build/requirements-signing.txt (in the runtime image: build it with MODEL_SIGNING=1)"


def public_key_from_env(explicit: Path | str | None = None) -> Path | None:
    """The public key a reader must verify with: ``explicit``, else $MODELBAKE_SIGNING_PUBLIC_KEY; None: off."""
    value = str(explicit) if explicit is not None else os.environ.get(PUBLIC_KEY_ENV, "")
    return Path(value) if value.strip() else None


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as exc:
        raise SigningError(f"verifying or making a signature needs model_signing ({exc}): {INSTALL_HINT}") from exc
    return model_signing


def _public_key(key: Path, private: bool) -> Any:
    """The EC public key of a PEM file holding the private key (``private``: only that) or the public one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = key.read_bytes()
        try:
            public = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            if private:
                raise
            public = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        kind = "an unencrypted EC private key" if private else "an EC key"
        raise SigningError(f"{key}: not {kind} in PEM ({first_line(exc, with_type=False)})") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SigningError(f"{key}: a {type(public).__name__}; model signing takes EC keys (P-256, P-384, P-521)")
    return public


def key_id(key: Path, *, private: bool = False) -> str:
    """A short public fingerprint of a key pair (sha256 of the public key's DER), from its private or public
    PEM: safe to print and to pass as a build argument (the signing step's cache key, so a new key signs
    again). ``private``: only an unencrypted EC private key will do. One-line SigningError otherwise."""
    from cryptography.hazmat.primitives import serialization

    public = _public_key(key, private)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def public_key_pem(key: Path, *, private: bool = False) -> str:
    """The public key of a key pair as PEM text (what readers verify with), from its private or public PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = _public_key(key, private).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def _readable(key: Path, name: str, fix: str) -> None:
    """A key file that is missing or unreadable (a mount the service user cannot read) is one line."""
    try:
        with key.open("rb"):
            pass
    except FileNotFoundError as exc:
        raise SigningError(f"{name}: no key there; {fix}") from exc
    except OSError as exc:
        raise SigningError(
            f"{name}: cannot read it ({exc.strerror}); it must be readable by uid {os.getuid()}, and its folder "
            f"searchable"
        ) from exc


def sign_tree(root: Path, private_key: Path) -> Path:
    """Sign every file under ``root`` (the signature file itself excepted) with an elliptic-curve private key
    (PEM, P-256/384/521, no password); returns the signature's path. Written aside, then renamed."""
    model_signing = _model_signing()
    _readable(private_key, str(private_key), "give a PEM elliptic-curve private key")
    signature = root / SIGNATURE_NAME
    partial = root.parent / f".{SIGNATURE_NAME}.{os.getpid()}"
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])
    try:
        config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
        config.set_hashing_config(hashing).sign(root, partial)
    except ValueError as exc:
        partial.unlink(missing_ok=True)
        raise SigningError(
            f"{private_key}: cannot sign with it ({first_line(exc, with_type=False)}); use a P-256 EC key"
        ) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(signature)
    return signature


def check_signature(root: Path, public_key: Path | str | None = None) -> str | None:
    """What every way into a tree does first: with a public key (``public_key``, else
    $MODELBAKE_SIGNING_PUBLIC_KEY), :func:`verify_tree`; without one, nothing (None)."""
    key = public_key_from_env(public_key)
    return None if key is None else verify_tree(root, key)


def verify_tree(root: Path, public_key: Path) -> str:
    """Check ``root``'s signature with ``public_key``: every file signed, none added, none changed. One-line
    SigningError otherwise. Returns a short description for a verify row."""
    signature = root / SIGNATURE_NAME
    _readable(public_key, f"{PUBLIC_KEY_ENV}={public_key}", "mount it, or unset the variable")
    if not signature.is_file():
        raise SigningError(
            f"{root}: unsigned ({SIGNATURE_NAME} missing) but a public key is configured ({PUBLIC_KEY_ENV}); "
            f"build the tree with a signing key, or unset {PUBLIC_KEY_ENV} to accept unsigned trees"
        )
    model_signing = _model_signing()
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(root, signature)
    except Exception as exc:  # ValueError (mismatch, wrong key), InvalidSignature, a malformed bundle
        why = first_line(exc, with_type=False)
        raise SigningError(f"{root}: signature check failed ({why}); the tree or its signature was altered") from exc
    return f"{SIGNATURE_NAME} verified with key {key_id(public_key)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelbake.signature", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sign = sub.add_parser("sign", help="sign a model tree (writes TREE/model.sig)")
    sign.add_argument("tree", type=Path)
    sign.add_argument("--private-key", type=Path, required=True)
    check = sub.add_parser("verify", help="verify a model tree's signature")
    check.add_argument("tree", type=Path)
    check.add_argument("--public-key", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "sign":
            print(f"signed: {sign_tree(args.tree, args.private_key)} (key {key_id(args.private_key)})")
        else:
            print(f"ok: {verify_tree(args.tree, args.public_key)}")
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
