"""crypto.sources: the KEK sources the operator and the CLI share."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from rotation_operator.crypto import codec, sources
from rotation_operator.crypto.kek import SecretKek
from rotation_operator.errors import ConfigError, KekError, KekFormatError

KEY = bytes(range(32))
TEXT_KEY = b"correct horse battery staple 123"  # 32 printable characters


@pytest.mark.parametrize("raw", [KEY, KEY.hex().encode(), base64.b64encode(KEY),
                                 base64.urlsafe_b64encode(KEY).rstrip(b"="),
                                 b"  " + KEY.hex().encode() + b"\n"])
def test_secret_kek_reads_every_accepted_form(raw: bytes) -> None:
    weak: list[str] = []
    kek = sources.secret_kek(raw, "Secret ns/app-kek key kek", on_weak=weak.append)
    assert isinstance(kek, SecretKek)
    assert kek.fingerprint == codec.kek_fingerprint(KEY)
    assert kek.describe() == "Secret ns/app-kek key kek"
    assert weak == []


def test_a_text_like_kek_is_named_weak_and_still_used() -> None:
    weak: list[str] = []
    kek = sources.secret_kek(TEXT_KEY, "Secret ns/app-kek key kek", on_weak=weak.append)
    assert weak == ["Secret ns/app-kek key kek"]
    assert kek.fingerprint == codec.kek_fingerprint(TEXT_KEY)


def test_a_malformed_kek_names_the_source_and_length_never_the_value() -> None:
    with pytest.raises(KekFormatError) as info:
        sources.secret_kek(b"not-a-key-at-all", "Secret ns/app-kek key kek")
    message = str(info.value)
    assert message.startswith("Secret ns/app-kek key kek: ") and "found 16 bytes" in message
    assert "not-a-key" not in message


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(base64.b64encode(KEY) + b"\n")
    kek = sources.from_file(path, "--kek-file")
    assert kek.fingerprint == codec.kek_fingerprint(KEY)
    assert kek.describe() == f"--kek-file {path}"
    with pytest.raises(KekError, match=r"cannot read --kek-file .*missing"):
        sources.from_file(tmp_path / "missing", "--kek-file")


def test_from_env_reads_the_bytes_of_the_variable() -> None:
    weak: list[str] = []
    kek = sources.from_env("APP_KEK", on_weak=weak.append, environ={b"APP_KEK": TEXT_KEY})
    assert kek.describe() == "$APP_KEK" and weak == ["$APP_KEK"]
    with pytest.raises(KekError, match=r"no KEK: set \$APP_KEK"):
        sources.from_env("APP_KEK", environ={})


def test_from_spec_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(KEY.hex().encode())
    env = {b"OLD_KEK": KEY}
    by_file = sources.from_spec(f"file:{path}", "--previous-kek", environ=env)
    by_env = sources.from_spec("env:OLD_KEK", "--previous-kek", environ=env)
    assert by_file.fingerprint == by_env.fingerprint == codec.kek_fingerprint(KEY)
    assert by_file.describe() == f"--previous-kek {path}" and by_env.describe() == "$OLD_KEK"


@pytest.mark.parametrize("spec", ["file:", "env:", "kms:alias/x", "plain", ""])
def test_from_spec_refuses_an_unknown_form(spec: str) -> None:
    with pytest.raises(ConfigError, match="expected file:PATH, env:NAME or pkcs11:"):
        sources.from_spec(spec, "--kek")


@pytest.mark.parametrize(("spec", "missing"), [
    ("pkcs11:token=t,key=k,pin-env=PIN", "module"),
    ("pkcs11:module=/m.so,key=k,pin-env=PIN", "token"),
    ("pkcs11:module=/m.so,token=t,pin-file=/p", "key"),
    ("pkcs11:module=/m.so,token=t,key=k", "the PIN"),
])
def test_a_pkcs11_spec_names_what_it_lacks(spec: str, missing: str) -> None:
    with pytest.raises(ConfigError, match=f"missing: {missing}"):
        sources.from_spec(spec, "--kek")


def test_a_pkcs11_spec_without_its_pin_fails_before_the_token(tmp_path: Path) -> None:
    spec = "pkcs11:module=/nowhere.so,token=t,key=k"
    with pytest.raises(KekError, match=r"no PIN: set \$HSM_PIN for --kek"):
        sources.from_spec(f"{spec},pin-env=HSM_PIN", "--kek", environ={b"HSM_PIN": b"  \n"})
    with pytest.raises(KekError, match="cannot read the PIN file of --kek"):
        sources.from_spec(f"{spec},pin-file={tmp_path / 'none'}", "--kek", environ={})


def test_pkcs11_kek_names_a_missing_module_without_the_pin() -> None:
    from rotation_operator.crypto.pkcs11 import HSMModuleMissing

    with pytest.raises(HSMModuleMissing) as info:
        sources.pkcs11_kek("/nowhere/libsofthsm2.so", "t", "k", b"  s3cret-pin\n")
    assert "/nowhere/libsofthsm2.so" in str(info.value) and "s3cret" not in str(info.value)
