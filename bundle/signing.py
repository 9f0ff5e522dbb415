"""Ed25519 bundle signatures and the device's trust policy.

What is signed: ``manifest.json``, byte for byte (prefixed with a fixed context string). The manifest holds
every bundle file's sha256 and size, and the runtime refuses a file that does not match, so one signature
covers the whole bundle. The signature lives next to the manifest in ``manifest.sig`` (canonical JSON: schema,
version, algorithm, key id, the manifest's sha256 and the signature in hex), so the manifest itself is
unchanged and still verifiable by hash, and old runtimes ignore the extra file.

Key handling (see also the README): ``fundus-edge keys generate --out DIR --name NAME`` writes ``NAME.key`` (PKCS#8
PEM, mode 0600, encrypted when ``--passphrase-env VAR`` names an environment variable holding a passphrase) and
``NAME.pub`` (SubjectPublicKeyInfo PEM). Existing files are never overwritten. The key id is the first 16 hex digits
of the sha256 of the raw 32-byte public key. The private key stays on the build machine (or better, offline, used
only to sign released bundles); only ``.pub`` files are copied into the device's trusted-keys directory. A private
key file readable by group or others is refused, as ssh does. Nothing in the kit prints, logs or audits key material
or passphrases: only key ids and file paths.

Policy on the device (:class:`TrustPolicy`): with ``require_signature`` a bundle must carry a signature by one
of the trusted keys and match it, else it is refused (:class:`~fundus_edge.errors.BundleSignatureError`, whose
``reason`` is ``unsigned``, ``untrusted-key``, ``bad-signature``, ``malformed-signature`` or ``mismatch``).
With trusted keys but without ``require_signature``, a signed bundle must verify, and an unsigned one is
loaded and reported as unsigned. Verification needs the ``cryptography`` package: ``fundus-edge[secure]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleSignatureError, MissingDependencyError, UsageError
from .read import MANIFEST, MAX_MANIFEST_BYTES, Bundle, load_bundle, read_bundle_file

SIGNATURE_FILE = "manifest.sig"
SIGNATURE_SCHEMA = "fundus-edge/bundle-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
CONTEXT = b"fundus-edge bundle manifest v1\n"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"

_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _crypto(purpose: str) -> Any:
    """The ``cryptography`` ed25519 and serialization modules, or a MissingDependencyError naming the extra."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise MissingDependencyError("cryptography", "secure", purpose) from exc
    return ed25519, serialization


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class SigningKey:
    """A loaded Ed25519 private key. Its repr shows the key id only; the key material is not reachable
    through any public attribute."""

    def __init__(self, key: Any, source: Path) -> None:
        self._key = key
        self.source = source
        _, serialization = _crypto("Signing a bundle")
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id_of(raw)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._key.sign(message))

    def public_key(self) -> PublicKey:
        return PublicKey(self._key.public_key(), self.key_id, self.source.with_suffix(PUBLIC_SUFFIX))

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, source={str(self.source)!r})"


class PublicKey:
    """An Ed25519 public key with its key id."""

    def __init__(self, key: Any, key_id: str, source: Path) -> None:
        self._key = key
        self.key_id = key_id
        self.source = source

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id!r}, source={str(self.source)!r})"


@dataclass(frozen=True)
class GeneratedKeys:
    private: Path
    public: Path
    key_id: str

    def to_dict(self) -> dict[str, str]:
        return {"private": str(self.private), "public": str(self.public), "key_id": self.key_id}


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` and write ``data``; never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise UsageError(f"{path} exists; keys are never overwritten. Choose another --name or --out") from exc
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(out_dir: str | os.PathLike[str], name: str, passphrase: bytes | None = None) -> GeneratedKeys:
    """Write ``NAME.key`` (0600) and ``NAME.pub`` into ``out_dir``; returns their paths and the key id."""
    ed25519, serialization = _crypto("Generating a signing key")
    if not _NAME.match(name):
        raise UsageError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / (name + PRIVATE_SUFFIX), out / (name + PUBLIC_SUFFIX)
    for p in (private, public):
        if p.exists():
            raise UsageError(f"{p} exists; keys are never overwritten. Choose another --name or --out")
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    pub = key.public_key()
    pub_pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    _write_new(private, pem, 0o600)
    _write_new(public, pub_pem, 0o644)
    return GeneratedKeys(private, public, key_id_of(raw))


def load_signing_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> SigningKey:
    """Load a private key for signing. Refuses keys readable by group/others (POSIX) and non-Ed25519 keys."""
    ed25519, serialization = _crypto("Signing a bundle")
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the signing key {p}: {exc.strerror or exc}") from exc
    if sys.platform != "win32" and stat.S_IMODE(st.st_mode) & 0o077:
        raise UsageError(f"signing key {p} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                         f"run: chmod 600 {p}")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for an unencrypted key
        why = ("a passphrase was given but the key is not encrypted" if passphrase else
               "the key is encrypted; name the environment variable holding its passphrase with "
               "--sign-key-passphrase-env")
        raise UsageError(f"signing key {p}: {why}") from exc
    except ValueError as exc:
        raise UsageError(f"signing key {p} cannot be read: wrong passphrase, or not a PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"signing key {p} is not an Ed25519 key; create one with 'fundus-edge keys generate'")
    return SigningKey(key, p)


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    ed25519, serialization = _crypto("Verifying bundle signatures")
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"trusted key {p} is not a readable PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"trusted key {p} is not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(key, key_id_of(raw), p)


def load_trusted_keys(directory: str | os.PathLike[str]) -> dict[str, PublicKey]:
    """Every ``*.pub`` in ``directory`` by key id. A directory without keys is a configuration error."""
    d = Path(directory)
    if not d.is_dir():
        raise UsageError(f"trusted keys directory {d} does not exist")
    if any(d.glob("*" + PRIVATE_SUFFIX)):
        raise UsageError(f"{d} holds a private key ({PRIVATE_SUFFIX}); the device's trusted-keys directory "
                         f"takes public keys ({PUBLIC_SUFFIX}) only. Move the private key off the device")
    keys = {k.key_id: k for k in map(load_public_key, sorted(d.glob("*" + PUBLIC_SUFFIX)))}
    if not keys:
        raise UsageError(f"trusted keys directory {d} holds no {PUBLIC_SUFFIX} files")
    return keys


# --------------------------------------------------------------------------------------------- signing
def _canonical(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def sign_bundle(root: str | os.PathLike[str], key: SigningKey) -> Path:
    """Sign ``root/manifest.json`` and write ``root/manifest.sig`` atomically."""
    r = Path(root)
    manifest = (r / MANIFEST).read_bytes()
    doc = {"schema": SIGNATURE_SCHEMA, "version": SIGNATURE_VERSION, "algorithm": ALGORITHM, "key_id": key.key_id,
           "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "signature": key.sign(CONTEXT + manifest).hex()}
    tmp = r / (SIGNATURE_FILE + ".tmp")
    tmp.write_bytes(_canonical(doc))
    os.replace(tmp, r / SIGNATURE_FILE)
    return r / SIGNATURE_FILE


def read_signature(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``manifest.sig``, None when absent. Anything but the exact canonical form is refused."""
    p = Path(root) / SIGNATURE_FILE
    raw = read_bundle_file(Path(root), SIGNATURE_FILE, 4096, missing_ok=True)  # a regular file, never a FIFO
    if raw is None:
        return None

    def bad(why: str) -> BundleSignatureError:
        return BundleSignatureError("malformed-signature", f"{p} is damaged or altered ({why}); do not use this "
                                                           "bundle: copy it again from its source")

    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise bad("not JSON") from exc
    if not isinstance(doc, dict) or set(doc) != {"schema", "version", "algorithm", "key_id", "manifest_sha256",
                                                 "signature"}:
        raise bad("unexpected fields")
    if doc["schema"] != SIGNATURE_SCHEMA or doc["version"] != SIGNATURE_VERSION or doc["algorithm"] != ALGORITHM:
        raise bad(f"not a {SIGNATURE_SCHEMA} v{SIGNATURE_VERSION} {ALGORITHM} signature")
    for name, pattern in (("key_id", _HEX16), ("manifest_sha256", _HEX64), ("signature", _HEX128)):
        if not isinstance(doc[name], str) or not pattern.match(doc[name]):
            raise bad(f"malformed {name}")
    if raw != _canonical(doc):
        raise bad("not in canonical form")
    return doc


# --------------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class TrustPolicy:
    """Which bundles this device runs. ``TrustPolicy()`` (the default) checks no signatures."""

    trusted_keys: Path | None = None
    require_signature: bool = False
    # keys named on the command line under a config that requires signatures: only keys in both are trusted
    narrow_to: Path | None = None

    def __post_init__(self) -> None:
        if self.require_signature and self.trusted_keys is None:
            raise UsageError("require_signature needs trusted keys: pass --trusted-keys DIR (a directory of .pub "
                             "files) or set trusted_keys in the device config's [security] table")

    @property
    def active(self) -> bool:
        return self.trusted_keys is not None or self.require_signature

    def to_dict(self) -> dict[str, Any]:
        return {"trusted_keys": str(self.trusted_keys) if self.trusted_keys else None,
                "require_signature": self.require_signature, "narrow_to": str(self.narrow_to or "") or None}

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> TrustPolicy:
        """The ``[security]`` table of a TOML device config: ``trusted_keys`` (relative to the config file)
        and ``require_signature``. Other tables are ignored; unknown keys in ``[security]`` are refused."""
        p = Path(path)
        toml: Any
        try:
            import tomllib as toml
        except ImportError:  # Python 3.10
            try:
                import tomli as toml  # type: ignore[no-redef,unused-ignore]
            except ImportError as exc:
                raise MissingDependencyError("tomli", "secure", "Reading a device config on Python 3.10") from exc
        try:
            with open(p, "rb") as fh:
                data = toml.load(fh)
        except OSError as exc:
            raise UsageError(f"cannot read the device config {p}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise UsageError(f"device config {p} is not valid TOML: {exc}") from exc
        sec = data.get("security", {})
        if not isinstance(sec, dict):
            raise UsageError(f"{p}: [security] must be a table")
        unknown = set(sec) - {"trusted_keys", "require_signature"}
        if unknown:
            raise UsageError(f"{p}: unknown [security] settings {sorted(unknown)}; known: require_signature, "
                             "trusted_keys")
        require = sec.get("require_signature", False)
        if not isinstance(require, bool):
            raise UsageError(f"{p}: require_signature must be true or false")
        keys = sec.get("trusted_keys")
        if keys is not None and not isinstance(keys, str):
            raise UsageError(f"{p}: trusted_keys must be a directory path")
        return cls(trusted_keys=(p.parent / keys) if keys else None, require_signature=require)

    def tightened(self, trusted_keys: Path | None, require_signature: bool) -> TrustPolicy:
        """This policy combined with command-line options, which can add requirements but never relax the
        config's: under a config that requires signatures, --trusted-keys only narrows its keys."""
        if self.require_signature and self.trusted_keys is not None and trusted_keys is not None:
            return TrustPolicy(self.trusted_keys, True, narrow_to=trusted_keys)
        return TrustPolicy(trusted_keys=trusted_keys or self.trusted_keys,
                           require_signature=self.require_signature or require_signature)


@dataclass(frozen=True)
class SignatureStatus:
    """What is known about a bundle's signature after :func:`verify_bundle_signature`."""

    signed: bool
    verified: bool
    key_id: str | None
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"signed": self.signed, "verified": self.verified, "key_id": self.key_id}


def verify_bundle_signature(root: str | os.PathLike[str], policy: TrustPolicy) -> SignatureStatus:
    """Check ``manifest.sig`` against the policy. Raises :class:`BundleSignatureError` with a reason.

    Checks only the signature over ``manifest.json``; the files' checksums are checked by ``load_bundle``
    (:func:`verify_bundle` does both and ties them together by the manifest's sha256).
    """
    r = Path(root)
    if not policy.active:
        return SignatureStatus(signed=os.path.lexists(r / SIGNATURE_FILE), verified=False, key_id=None,
                               manifest_sha256=_manifest_digest(r))
    keys = load_trusted_keys(policy.trusted_keys) if policy.trusted_keys else {}
    if policy.narrow_to is not None:
        keys = {k: v for k, v in keys.items() if k in load_trusted_keys(policy.narrow_to)}
    return check_signature(r, keys, policy.require_signature, f"the trusted keys in {policy.trusted_keys}")


def _manifest_digest(root: Path) -> str:
    return hashlib.sha256(read_bundle_file(root, MANIFEST, MAX_MANIFEST_BYTES) or b"").hexdigest()


def check_signature(root: str | os.PathLike[str], keys: dict[str, PublicKey], require: bool,
                    keys_label: str = "the trusted keys") -> SignatureStatus:
    """Verify ``manifest.sig`` of ``root`` against ``keys`` (by key id)."""
    r = Path(root)
    manifest = read_bundle_file(r, MANIFEST, MAX_MANIFEST_BYTES) or b""
    digest = hashlib.sha256(manifest).hexdigest()
    doc = read_signature(r)
    if doc is None:
        if require:
            raise BundleSignatureError("unsigned", f"bundle {r} is not signed ({SIGNATURE_FILE} missing) and this "
                                                   "device requires signed bundles; ask its publisher for a "
                                                   "signed copy")
        return SignatureStatus(signed=False, verified=False, key_id=None, manifest_sha256=digest)
    key = keys.get(doc["key_id"])
    if key is None:
        raise BundleSignatureError("untrusted-key", f"bundle {r} is signed by key {doc['key_id']}, which is not "
                                                    f"among {keys_label}; refusing it")
    if doc["manifest_sha256"] != digest:
        raise BundleSignatureError("mismatch", f"bundle {r}: {MANIFEST} was changed after it was signed; "
                                               "do not use this bundle")
    if not key.verify(bytes.fromhex(doc["signature"]), CONTEXT + manifest):
        raise BundleSignatureError("bad-signature", f"bundle {r}: the signature by key {key.key_id} does not match "
                                                    f"{MANIFEST}; it was altered or damaged. Do not use it")
    return SignatureStatus(signed=True, verified=True, key_id=key.key_id, manifest_sha256=digest)


def verify_bundle(path: str | os.PathLike[str], policy: TrustPolicy) -> tuple[Bundle, SignatureStatus]:
    """The signature per ``policy``, then the schema and every file's checksum (:func:`load_bundle`).

    The manifest that was verified is the manifest that was loaded: their sha256 must agree, else the bundle
    changed in between and is refused.
    """
    status = verify_bundle_signature(path, policy)
    bundle = load_bundle(path)
    if status.verified and bundle.manifest_sha256 != status.manifest_sha256:
        raise BundleSignatureError("mismatch", f"bundle {path}: {MANIFEST} changed while it was being loaded; "
                                               "refusing it")
    return bundle, status


def load_trusted(path: str | os.PathLike[str], policy: TrustPolicy, **load_kwargs: Any) -> tuple[Any, SignatureStatus]:
    """:func:`verify_bundle`, then :func:`fundus_edge.runtime.load` on the verified bundle.
    Returns ``(screener, status)``."""
    from ..runtime.screen import load

    bundle, status = verify_bundle(path, policy)
    return load(bundle, **load_kwargs), status
