"""``status.kek`` of a PKCS#11 KEK says what its token says of the key (issue #17):
``alwaysSensitive`` and ``neverExtractable``; a KEK held in memory has neither, and a
switch back to one removes them (None in the merge patch)."""

from __future__ import annotations

from rotation_operator.crypto.kek import SecretKek
from rotation_operator.operator import status
from tests.unit.test_status import snap


class TokenKey:
    """What status reads of a Pkcs11Kek (tests/hsm checks the real one reports them)."""

    always_sensitive = True
    never_extractable = False


def test_a_pkcs11_kek_shows_what_the_token_says_of_its_key() -> None:
    protection = status.kek_protection(TokenKey())
    assert protection == {"alwaysSensitive": True, "neverExtractable": False}
    fields = status.kek_fields(snap(), {"fp-new"}, "fp-new", "pkcs11 token 't' key 'k'",
                               protection)
    assert fields["kek"] == {"fingerprint": "fp-new", "source": "pkcs11 token 't' key 'k'",
                             "previousKeksNeeded": True, "alwaysSensitive": True,
                             "neverExtractable": False}
    # the refresh reads no KEK: it keeps what the status shows
    assert status.kek_fields_from_status(snap(), fields) == fields


def test_a_secret_kek_removes_them() -> None:
    protection = status.kek_protection(SecretKek(bytes(range(32)), "Secret ns/k key kek"))
    assert protection == {"alwaysSensitive": None, "neverExtractable": None}
    fields = status.kek_fields(snap(), {"fp-new"}, "fp-new", "Secret ns/k key kek", protection)
    assert fields["kek"]["alwaysSensitive"] is None and fields["kek"]["neverExtractable"] is None
    shown = {"kek": {"fingerprint": "fp-new", "source": "Secret ns/k key kek"}, "keys": []}
    assert set(status.kek_fields_from_status(snap(), shown)["kek"]) == {
        "fingerprint", "source", "previousKeksNeeded"}
