"""--trusted-keys can only narrow what a device config that requires signatures trusts, never add to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fundus_edge.bundle.signing import (
    TrustPolicy,
    generate_keypair,
    load_signing_key,
    sign_bundle,
    verify_bundle_signature,
)
from fundus_edge.errors import BundleSignatureError


def _dir_with(tmp: Path, name: str, *pubs: Path) -> Path:
    d = tmp / name
    d.mkdir()
    for p in pubs:
        (d / p.name).write_bytes(p.read_bytes())
    return d


def test_command_line_keys_narrow_the_config_never_widen_it(bundle_copy: Path, tmp_path: Path) -> None:
    clinic = generate_keypair(tmp_path / "k", "clinic")
    other = generate_keypair(tmp_path / "k", "other")
    attacker = generate_keypair(tmp_path / "k", "attacker")
    config = TrustPolicy(trusted_keys=_dir_with(tmp_path, "etc", clinic.public, other.public), require_signature=True)
    mine = _dir_with(tmp_path, "mine", attacker.public)

    sign_bundle(bundle_copy, load_signing_key(attacker.private))
    assert verify_bundle_signature(bundle_copy, TrustPolicy(mine, True)).verified  # on its own it would pass
    with pytest.raises(BundleSignatureError) as info:
        verify_bundle_signature(bundle_copy, config.tightened(mine, False))
    assert info.value.reason == "untrusted-key"

    sign_bundle(bundle_copy, load_signing_key(other.private))
    assert verify_bundle_signature(bundle_copy, config.tightened(None, False)).verified
    only_clinic = _dir_with(tmp_path, "only-clinic", clinic.public)
    with pytest.raises(BundleSignatureError):  # narrowed to the clinic's key: 'other' no longer counts
        verify_bundle_signature(bundle_copy, config.tightened(only_clinic, False))
    # without a config that requires signatures, --trusted-keys sets the keys as before
    assert TrustPolicy().tightened(mine, True) == TrustPolicy(mine, True)
