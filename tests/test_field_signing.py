"""Signed bundles: keys, signatures, the device's trust policy, and refusals (audited, with a reason)."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.bundle.read import MANIFEST
from fundus_edge.bundle.signing import (
    SIGNATURE_FILE,
    TrustPolicy,
    generate_keypair,
    load_signing_key,
    sign_bundle,
    verify_bundle,
)
from fundus_edge.cli import main
from fundus_edge.errors import (
    BundleError,
    BundleIntegrityError,
    BundleSignatureError,
    MissingDependencyError,
    UsageError,
)
from fundus_edge.runtime.field.audit import verify_audit_log


def key_secrets(private: Path, passphrase: bytes | None = None) -> list[str]:
    """Strings that would reveal a private key if they showed up in any output."""
    from cryptography.hazmat.primitives import serialization

    pem = private.read_text()
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    key = serialization.load_pem_private_key(private.read_bytes(), password=passphrase)
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return [*body, raw.hex(), base64.b64encode(raw).decode(), "PRIVATE KEY"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("keys")
    clinic = generate_keypair(root / "publisher", "clinic")
    attacker = generate_keypair(root / "attacker", "attacker")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(clinic.public, trusted)
    return {"clinic": clinic, "attacker": attacker, "trusted": trusted,
            "policy": TrustPolicy(trusted_keys=trusted, require_signature=True)}


@pytest.fixture()
def signed(bundle_copy: Path, keys: dict[str, Any]) -> Path:
    sign_bundle(bundle_copy, load_signing_key(keys["clinic"].private))
    return bundle_copy


def test_keys_generate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "k1", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    priv, pub = Path(doc["private"]), Path(doc["public"])
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert len(doc["key_id"]) == 16
    for secret in key_secrets(priv):
        assert secret not in out.out + out.err
    # never overwritten
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "k1"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    # encrypted with a passphrase taken from the environment, never from argv
    monkeypatch.setenv("FE_TEST_PASS", "correct horse battery staple")
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "k2", "--passphrase-env", "FE_TEST_PASS"]) == 0
    out2 = capsys.readouterr()
    assert "correct horse" not in out2.out + out2.err
    k2 = tmp_path / "k2.key"
    assert "ENCRYPTED PRIVATE KEY" in k2.read_text()
    assert load_signing_key(k2, b"correct horse battery staple").key_id in out2.out
    with pytest.raises(UsageError, match="wrong passphrase"):
        load_signing_key(k2, b"wrong")
    with pytest.raises(UsageError, match="passphrase-env"):
        load_signing_key(k2)
    assert "correct" not in repr(load_signing_key(k2, b"correct horse battery staple"))
    monkeypatch.delenv("FE_TEST_PASS")
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "k3", "--passphrase-env", "FE_TEST_PASS"]) == 2


def test_signing_key_readable_by_others_is_refused(keys: dict[str, Any], tmp_path: Path) -> None:
    k = tmp_path / "loose.key"
    shutil.copy(keys["clinic"].private, k)
    k.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        load_signing_key(k)


def test_signed_bundle_verifies_screens_and_records_the_key(signed: Path, keys: dict[str, Any], tmp_path: Path,
                                                             real_photos: list[Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    kid = keys["clinic"].key_id
    assert main(["keys", "verify", "--bundle", str(signed), "--trusted-keys", str(keys["trusted"])]) == 0
    assert kid in capsys.readouterr().out
    db = tmp_path / "r.db"
    code = main(["screen", "--bundle", str(signed), "--trusted-keys", str(keys["trusted"]), "--require-signature",
                 "--store", str(db), "--patient-id", "PAT-7731", "--eye", "OS", str(real_photos[0]), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert doc["signature"] == {"signed": True, "verified": True, "key_id": kid}
    assert doc["results"][0]["signature_key_id"] == kid and "patient_id" not in doc["results"][0]
    audit = (tmp_path / "r.audit.jsonl").read_text()
    loaded = next(json.loads(x) for x in audit.splitlines() if '"bundle-loaded"' in x)
    assert loaded["signature"]["verified"] and loaded["policy"]["require_signature"]
    for secret in [*key_secrets(keys["clinic"].private), "PAT-7731"]:
        assert secret not in out.out + out.err + audit


def _flip(path: Path, i: int, mask: int = 0x01) -> bytes:
    """XOR one byte of the file in place; returns the original contents."""
    data = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([data[i] ^ mask]), i)
    finally:
        os.close(fd)
    return data


def test_every_byte_of_manifest_and_signature_is_covered(signed: Path, keys: dict[str, Any]) -> None:
    policy = keys["policy"]
    verify_bundle(signed, policy)  # intact: accepted
    refused = 0
    for name in (MANIFEST, SIGNATURE_FILE):
        p = signed / name
        data = p.read_bytes()
        fd = os.open(p, os.O_WRONLY)  # flip each byte in place (rewriting the file 6000 times is slow on CI)
        try:
            for i in range(len(data)):
                os.pwrite(fd, bytes([data[i] ^ 0x01]), i)
                with pytest.raises(BundleError):
                    verify_bundle(signed, policy)
                os.pwrite(fd, data[i:i + 1], i)
                refused += 1
        finally:
            os.close(fd)
    assert refused == (signed / MANIFEST).stat().st_size + (signed / SIGNATURE_FILE).stat().st_size > 5000
    verify_bundle(signed, policy)


def test_tampered_bundle_files_are_refused(signed: Path, keys: dict[str, Any]) -> None:
    policy = keys["policy"]
    files = json.loads((signed / MANIFEST).read_text())["files"]
    rng = random.Random(7)
    for rel in files:
        p = signed / rel
        n = p.stat().st_size
        for i in {0, n // 2, n - 1, *(rng.randrange(n) for _ in range(4))}:
            original = _flip(p, i, 0x80)
            with pytest.raises(BundleIntegrityError, match=rel):
                verify_bundle(signed, policy)
            p.write_bytes(original)
        original = p.read_bytes()
        for damaged in (original[:-1], original + b"\n", None):
            if damaged is None:
                p.unlink()
            else:
                p.write_bytes(damaged)
            with pytest.raises(BundleIntegrityError, match=rel):
                verify_bundle(signed, policy)
            p.write_bytes(original)
    verify_bundle(signed, policy)


def _resign_with_model_change(bundle: Path, key: Any) -> None:
    """What an attacker with write access does: change a model, fix its hash in the manifest, sign."""
    model = bundle / "model.int8.onnx"
    _flip(model, model.stat().st_size // 3)
    m = json.loads((bundle / MANIFEST).read_text())
    from fundus_edge.bundle.read import file_entry

    m["files"]["model.int8.onnx"] = file_entry(model)
    (bundle / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    if key is not None:
        sign_bundle(bundle, key)


def test_policy_refusals_have_reasons(signed: Path, keys: dict[str, Any], tmp_path: Path) -> None:
    policy = keys["policy"]
    attacker = load_signing_key(keys["attacker"].private)

    def reason(b: Path, pol: TrustPolicy = policy) -> str:
        with pytest.raises(BundleSignatureError) as info:
            verify_bundle(b, pol)
        return info.value.reason

    def fresh(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(signed, d)
        return d

    unsigned = fresh("unsigned")
    (unsigned / SIGNATURE_FILE).unlink()
    assert reason(unsigned) == "unsigned"
    other = fresh("other-key")
    sign_bundle(other, attacker)
    assert reason(other) == "untrusted-key"
    # ...also without require_signature: a signature that is present must verify
    assert reason(other, TrustPolicy(trusted_keys=keys["trusted"])) == "untrusted-key"
    swapped_model = fresh("swapped-model")
    _resign_with_model_change(swapped_model, attacker)
    assert reason(swapped_model) == "untrusted-key"
    kept_sig = fresh("kept-signature")
    _resign_with_model_change(kept_sig, None)
    assert reason(kept_sig) == "mismatch"
    forged = fresh("forged-digest")  # manifest changed and the digest in manifest.sig updated to match
    _resign_with_model_change(forged, None)
    import hashlib

    sig = json.loads((forged / SIGNATURE_FILE).read_text())
    sig["manifest_sha256"] = hashlib.sha256((forged / MANIFEST).read_bytes()).hexdigest()
    (forged / SIGNATURE_FILE).write_text(json.dumps(sig, sort_keys=True, indent=2) + "\n")
    assert reason(forged) == "bad-signature"
    # a genuine signature from another bundle by the same trusted key
    sibling = fresh("sibling")
    m = json.loads((sibling / MANIFEST).read_text())
    m["name"] = "another-release"
    (sibling / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    sign_bundle(sibling, load_signing_key(keys["clinic"].private))
    stolen = fresh("stolen-sig")
    shutil.copy(sibling / SIGNATURE_FILE, stolen / SIGNATURE_FILE)
    assert reason(stolen) == "mismatch"
    # Trusted keys without require_signature: unsigned is accepted (and reported), signed must verify.
    _, status = verify_bundle(unsigned, TrustPolicy(trusted_keys=keys["trusted"]))
    assert not status.signed and not status.verified
    _, status = verify_bundle(signed, TrustPolicy(trusted_keys=keys["trusted"]))
    assert status.verified
    # No policy: no signature is read at all (the runtime does not need `cryptography` then).
    _, status = verify_bundle(other, TrustPolicy())
    assert status.signed and not status.verified


def test_refusal_is_audited_and_exits_4(bundle_copy: Path, keys: dict[str, Any], tmp_path: Path,
                                        real_photos: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    code = main(["screen", "--bundle", str(bundle_copy), "--trusted-keys", str(keys["trusted"]),
                 "--require-signature", "--audit-log", str(log), str(real_photos[0]), "--json"])
    out = capsys.readouterr()
    assert code == 4
    err = json.loads(out.out)["error"]
    assert err["code"] == "bundle-signature" and "not signed" in err["message"]
    assert "requires signed bundles" in out.err
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["bundle-refused"]
    assert entries[0]["reason"] == "unsigned" and entries[0]["code"] == "bundle-signature"
    assert verify_audit_log(log)
    # a tampered model file: refused by checksum, audited the same way
    _flip(bundle_copy / "model.fp32.onnx", 1000)
    sign_bundle(bundle_copy, load_signing_key(keys["clinic"].private))  # signature fine, file not
    assert main(["screen", "--bundle", str(bundle_copy), "--trusted-keys", str(keys["trusted"]),
                 "--require-signature", "--audit-log", str(log), str(real_photos[0])]) == 4
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "bundle-refused" and last["code"] == "bundle-integrity"
    assert "model.fp32.onnx" in last["message"]


def test_device_config_policy_cannot_be_relaxed(signed: Path, keys: dict[str, Any], tmp_path: Path,
                                                real_photos: list[Path], capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = tmp_path / "etc"
    shutil.copytree(keys["trusted"], cfg_dir / "trusted-keys")
    cfg = cfg_dir / "device.toml"
    cfg.write_text('[device]\nname = "pi-5"\n\n[security]\nrequire_signature = true\ntrusted_keys = "trusted-keys"\n')
    policy = TrustPolicy.from_config(cfg)
    assert policy.require_signature and policy.trusted_keys == cfg_dir / "trusted-keys"
    assert policy.tightened(None, False).require_signature  # the command line cannot switch it off
    unsigned = tmp_path / "unsigned"
    shutil.copytree(signed, unsigned)
    (unsigned / SIGNATURE_FILE).unlink()
    monkeypatch.setenv("FUNDUS_EDGE_STATE_DIR", str(tmp_path / "state"))
    assert main(["screen", "--bundle", str(unsigned), "--device-config", str(cfg), str(real_photos[0])]) == 4
    assert "not signed" in capsys.readouterr().err
    refusal = json.loads((tmp_path / "state" / "audit.jsonl").read_text().splitlines()[-1])
    assert refusal["reason"] == "unsigned"  # no --store or --audit-log: the state directory's audit log
    assert main(["screen", "--bundle", str(signed), "--device-config", str(cfg), str(real_photos[0])]) == 0
    for text, match in (("[security]\nrequire_signature = 'yes'\n", "true or false"),
                        ("[security]\nrequire_signatures = true\n", "unknown"),
                        ("[security]\nrequire_signature = true\n", "needs trusted keys"),
                        ("[security\n", "not valid TOML")):
        cfg.write_text(text)
        with pytest.raises(UsageError, match=match):
            TrustPolicy.from_config(cfg)


def test_trusted_dir_must_hold_public_keys_only(keys: dict[str, Any], tmp_path: Path, signed: Path) -> None:
    d = tmp_path / "trusted"
    shutil.copytree(keys["trusted"], d)
    shutil.copy(keys["clinic"].private, d)
    with pytest.raises(UsageError, match="private key"):
        verify_bundle(signed, TrustPolicy(trusted_keys=d, require_signature=True))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"no \.pub"):
        verify_bundle(signed, TrustPolicy(trusted_keys=empty, require_signature=True))
    (empty / "junk.pub").write_text("not a key")
    with pytest.raises(UsageError, match=r"junk\.pub"):
        verify_bundle(signed, TrustPolicy(trusted_keys=empty))


def test_missing_cryptography_names_the_extra(signed: Path, keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                              real_photos: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(MissingDependencyError, match=r"fundus-edge\[secure\]"):
        verify_bundle(signed, keys["policy"])
    assert main(["screen", "--bundle", str(signed), "--trusted-keys", str(keys["trusted"]), "--require-signature",
                 "--audit-log", str(signed.parent / "a.jsonl"), str(real_photos[0])]) == 3
    assert "pip install 'fundus-edge[secure]'" in capsys.readouterr().err
    verify_bundle(signed, TrustPolicy())  # without a policy the runtime does not need it


def test_sign_key_with_allow_failed_gate_is_refused_before_building(keys: dict[str, Any], tmp_path: Path,
                                                                    synth_val: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--model", "reference:dr-resnet18s", "--calib", str(synth_val.parent), "--val",
                 str(synth_val), "--out", str(tmp_path / "b"), "--sign-key", str(keys["clinic"].private),
                 "--allow-failed-gate"])
    assert code == 2 and "approval" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_tamper_sweep_quick(built: Any, tmp_path: Path) -> None:
    # benchmarks/field_reliability.py runs this with every byte of the manifest and signature, 200 per file
    from reliability import run_tamper_sweep

    r = run_tamper_sweep(built.out, tmp_path, positions_per_file=4, manifest_positions=8, seed=3)
    assert r["accepted"] == 0 and r["refused"] == r["attempts"] > 60, r["accepted_examples"]
    assert r["audited_refusals"] == r["refused"] and r["audit_chain_ok"]
    assert {"unsigned", "untrusted-key", "mismatch", "bad-signature", "malformed-signature",
            "bundle-integrity"} <= set(r["reasons"])
