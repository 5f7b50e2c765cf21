"""A KEK that lives in a hardware security module and never leaves it.

With a software KEK the key bytes sit in a Kubernetes Secret and in the operator's memory;
anyone who can read either can unwrap every DEK.  :class:`Pkcs11Kek` keeps the KEK (an
AES-256 key) inside a PKCS#11 token instead: the token itself performs the AES-256-GCM that
wraps and unwraps DEKs, and the operator only ever holds a handle to the key.

The bytes produced are *exactly* those of :func:`rotation_operator.crypto.codec.wrap_dek`
(``docs/format.md`` §1-2), so a keys table written with a software KEK can be read through
the HSM after importing the same key bytes into it, and the other way round.

The KEK fingerprint of ``docs/format.md`` §3 is an HMAC of the key, which a token holding a
non-extractable AES key cannot compute portably; this provider uses AES-CMAC instead
(:func:`cmac_fingerprint`, ``cmac:`` prefix), which the token computes and software can
reproduce from the key bytes.

PKCS#11 login state is per token *and per process*: a second ``C_Login`` fails with
``CKR_USER_ALREADY_LOGGED_IN`` and one ``C_Logout`` logs every session out.  So every
:class:`Pkcs11Kek` on the same token in this process shares one logged-in session (and its
lock); later openers must present the same PIN, which is checked against a keyed digest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

import pkcs11
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from rotation_operator.crypto import codec
from rotation_operator.errors import InvalidToken, KekError

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Library

__all__ = [
    "FINGERPRINT_LABEL",
    "HSMError",
    "HSMKeyMissing",
    "HSMKeyUnsuitable",
    "HSMLoginFailed",
    "HSMModuleMissing",
    "HSMTokenMissing",
    "Pkcs11Kek",
    "cmac_fingerprint",
]

#: The constant the KEK's AES-CMAC is computed over to name it.
FINGERPRINT_LABEL = b"rotation-operator/kek-fingerprint/cmac/v1"
_FINGERPRINT_PREFIX = "cmac:"
_FINGERPRINT_HEX_CHARS = 16
_TAG_BITS = codec.TAG_SIZE * 8
_REQUIRED_MECHANISMS = (Mechanism.AES_GCM, Mechanism.AES_CMAC)
_REQUIRED_USAGE = (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN)

#: What a token reports when a GCM open fails.  SoftHSM2 says CKR_GENERAL_ERROR; others say
#: CKR_ENCRYPTED_DATA_INVALID, or CKR_AEAD_DECRYPT_FAILED (0x35, PKCS#11 3.0, which
#: python-pkcs11 does not map: see :func:`_is_bad_ciphertext`).
_BAD_CIPHERTEXT = (
    p11.GeneralError,
    p11.FunctionFailed,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
)
_UNMAPPED_AEAD_DECRYPT_FAILED = "Unmapped error code 0x35"
_LOGIN_ERRORS = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinExpired,
    p11.PinLocked,
    p11.UserPinNotInitialized,
)


# --- errors ----------------------------------------------------------------------------


class HSMModuleMissing(KekError):
    """The PKCS#11 module (shared library) cannot be loaded or initialised."""

    reason = "HSMModuleMissing"
    retryable = True


class HSMTokenMissing(KekError):
    """No token (or more than one) carries the configured label."""

    reason = "HSMTokenMissing"
    retryable = True


class HSMLoginFailed(KekError):
    """The token refused the PIN (wrong, locked, expired, not set)."""

    reason = "HSMLoginFailed"
    retryable = True


class HSMKeyMissing(KekError):
    """No secret key (or more than one) carries the configured label on the token."""

    reason = "HSMKeyMissing"
    retryable = True


class HSMKeyUnsuitable(KekError):
    """The key is not AES-256, may not encrypt/decrypt/sign, or the token lacks GCM/CMAC."""

    reason = "HSMKeyUnsuitable"
    retryable = True


class HSMError(KekError):
    """Any other failure reported by the PKCS#11 library (device removed, session lost...).

    The message names the PKCS#11 exception class only, never its arguments.
    """

    reason = "HSMError"
    retryable = True


# --- software side of the fingerprint --------------------------------------------------


def cmac_fingerprint(kek: bytes) -> str:
    """The fingerprint :attr:`Pkcs11Kek.fingerprint` reports, computed from the key bytes.

    ``"cmac:" + lowercase_hex(AES-CMAC(kek, FINGERPRINT_LABEL))[0:16]``.  Used to check, before
    importing a software KEK into a token, which fingerprint the token will report.
    """
    if not isinstance(kek, bytes | bytearray):
        raise TypeError("kek must be bytes")
    if len(kek) != codec.KEY_SIZE:
        raise ValueError(f"kek must be {codec.KEY_SIZE} bytes, got {len(kek)}")
    mac = cmac.CMAC(algorithms.AES(bytes(kek)))
    mac.update(FINGERPRINT_LABEL)
    return _format_fingerprint(mac.finalize())


def _format_fingerprint(mac: bytes) -> str:
    return _FINGERPRINT_PREFIX + mac.hex()[:_FINGERPRINT_HEX_CHARS]


# --- the key handle as this module uses it ---------------------------------------------


class _AesKey(Protocol):
    """The part of a python-pkcs11 secret key object this module calls."""

    def __getitem__(self, key: Attribute) -> Any: ...

    def encrypt(self, data: bytes, **kwargs: Any) -> bytes | Iterator[bytes]: ...

    def decrypt(self, data: bytes, **kwargs: Any) -> bytes | Iterator[bytes]: ...

    def sign(self, data: bytes, **kwargs: Any) -> bytes: ...


# --- loaded libraries and shared logged-in sessions ------------------------------------

_registry_lock = threading.Lock()
_libraries: dict[str, Library] = {}
#: Keys the PIN digests: a digest is useless outside this process.
_PIN_DIGEST_KEY = secrets.token_bytes(32)


@dataclass(eq=False)
class _Connection:
    """One logged-in session to one token, shared by every :class:`Pkcs11Kek` on it."""

    registry_key: tuple[str, int]
    session: pkcs11.Session
    pin_digest: bytes
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_connections: dict[tuple[str, int], _Connection] = {}


def _load_library(module: str) -> tuple[str, Library]:
    """Load ``module`` once per real path (python-pkcs11 cannot load a library twice)."""
    path = os.path.realpath(module)
    with _registry_lock:
        lib = _libraries.get(path)
        if lib is None:
            lib = _open_library(module, path)
            _libraries[path] = lib
    return path, lib


def _open_library(module: str, path: str) -> Library:
    if not os.path.isfile(path):
        raise HSMModuleMissing(f"PKCS#11 module {module!r} does not exist")
    try:
        return pkcs11.lib(path)
    except p11.PKCS11Error as exc:
        stage = "loaded" if type(exc) is p11.PKCS11Error else "initialised (C_Initialize)"
        raise HSMModuleMissing(
            f"PKCS#11 module {module!r} cannot be {stage}: {type(exc).__name__}"
        ) from None


def _pin_text(pin: bytes | str, context: str) -> str:
    if isinstance(pin, str):
        return pin
    try:
        return bytes(pin).decode("utf-8")
    except UnicodeDecodeError:
        raise HSMLoginFailed(f"{context}: the PIN is not valid UTF-8") from None


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_DIGEST_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _acquire_connection(path: str, lib: Library, token: pkcs11.Token, pin: str,
                        context: str) -> _Connection:
    """The shared session for ``token``, logging in if this process has none yet."""
    registry_key = (path, token.slot.slot_id)
    digest = _pin_digest(pin)
    with _registry_lock:
        conn = _connections.get(registry_key)
        if conn is None:
            conn = _Connection(registry_key, _login(lib, token, pin, context), digest)
            _connections[registry_key] = conn
        elif not hmac.compare_digest(conn.pin_digest, digest):
            raise HSMLoginFailed(
                f"{context}: the PIN differs from the one this process is logged in with")
        conn.users += 1
        return conn


def _login(lib: Library, token: pkcs11.Token, pin: str, context: str) -> pkcs11.Session:
    try:
        return token.open(user_pin=pin)
    except _LOGIN_ERRORS as exc:
        _reclaim_leaked_session(lib)
        raise HSMLoginFailed(f"{context}: the token refused the PIN ({type(exc).__name__})"
                             ) from None
    except p11.PKCS11Error as exc:
        raise _hsm_error(context, exc) from None


def _reclaim_leaked_session(lib: Library) -> None:
    """Close the session python-pkcs11 leaves open when ``C_Login`` fails.

    ``Token.open`` calls ``C_OpenSession`` then ``C_Login`` and loses the handle if the
    login raises; an operator retrying a wrong PIN every minute would exhaust the HSM's
    sessions.  Only done while this process has no session on the library (C_Finalize
    closes them all).  Called with ``_registry_lock`` held.
    """
    if any(lib is _libraries.get(key[0]) for key in _connections):
        return
    with suppress(p11.PKCS11Error):  # best effort: the login error is what matters
        lib.reinitialize()


def _release_connection(conn: _Connection) -> None:
    with _registry_lock:
        conn.users -= 1
        if conn.users > 0:
            return
        del _connections[conn.registry_key]
        # C_Logout + C_CloseSession; the token may be gone already, leaving nothing to free
        with conn.lock, suppress(p11.PKCS11Error):
            conn.session.close()


def _find_token(lib: Library, token_label: str, slot_description: str | None,
                context: str) -> pkcs11.Token:
    tokens = [slot.get_token() for slot in lib.get_slots(token_present=True)
              if slot_description is None or slot.slot_description == slot_description]
    matches = [token for token in tokens if token.label == token_label]
    if len(matches) == 1:
        return matches[0]
    where = "" if slot_description is None else f" in slot {slot_description!r}"
    if not matches:
        raise HSMTokenMissing(f"{context}: no token labelled {token_label!r}{where} "
                              f"({len(tokens)} token(s) present)")
    raise HSMTokenMissing(f"{context}: {len(matches)} tokens are labelled {token_label!r}"
                          f"{where}; set the slot description to choose one")


def _find_key(session: pkcs11.Session, key_label: str, context: str) -> _AesKey:
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                      Attribute.LABEL: key_label}))
    if not found:
        raise HSMKeyMissing(f"{context}: no secret key labelled {key_label!r} on the token")
    if len(found) > 1:
        raise HSMKeyMissing(f"{context}: {len(found)} secret keys are labelled "
                            f"{key_label!r}; labels must be unique")
    return cast(_AesKey, found[0])


def _check_key(key: _AesKey, context: str) -> None:
    """Refuse anything but an AES-256 key allowed to encrypt, decrypt and sign."""
    if key[Attribute.KEY_TYPE] != KeyType.AES:
        raise HSMKeyUnsuitable(f"{context}: the key is not an AES key")
    length = key[Attribute.VALUE_LEN]
    if length != codec.KEY_SIZE:
        raise HSMKeyUnsuitable(
            f"{context}: the key is {length * 8}-bit AES; a KEK must be AES-256")
    missing = [attr.name for attr in _REQUIRED_USAGE if not key[attr]]
    if missing:
        names = ", ".join(f"CKA_{name}" for name in missing)
        raise HSMKeyUnsuitable(f"{context}: the key lacks {names}")


def _check_mechanisms(token: pkcs11.Token, context: str) -> None:
    offered = token.slot.get_mechanisms()
    missing = [mech.name for mech in _REQUIRED_MECHANISMS if mech not in offered]
    if missing:
        names = ", ".join(f"CKM_{name}" for name in missing)
        raise HSMKeyUnsuitable(f"{context}: the token does not offer {names}")


def _hsm_error(context: str, exc: p11.PKCS11Error) -> HSMError:
    return HSMError(f"{context}: {type(exc).__name__}")


def _is_bad_ciphertext(exc: p11.PKCS11Error) -> bool:
    if isinstance(exc, _BAD_CIPHERTEXT):
        return True
    return type(exc) is p11.PKCS11Error and exc.args == (_UNMAPPED_AEAD_DECRYPT_FAILED,)


def _gcm(nonce: bytes | bytearray, aad: bytes) -> pkcs11.GCMParams:
    # python-pkcs11 passes a pointer to ``nonce``'s buffer as CK_GCM_PARAMS.pIv; a bytearray
    # (which it accepts, though typed ``bytes``) lets a token legitimately write into it.
    return pkcs11.GCMParams(nonce, aad, _TAG_BITS)  # type: ignore[arg-type]


def _as_bytes(result: bytes | Iterator[bytes]) -> bytes:
    return result if isinstance(result, bytes) else b"".join(result)


# --- the provider ----------------------------------------------------------------------


class Pkcs11Kek:
    """An AES-256 KEK held by a PKCS#11 token, addressed by module, token and key label.

    Thread-safe: every token call is made under the lock of the shared session.  The PIN
    is used to log in and then forgotten (only a keyed digest is kept to check that later
    openers of the same token present the same PIN).
    """

    def __init__(self, module: str, token_label: str, key_label: str, pin: bytes | str, *,
                 slot_description: str | None = None) -> None:
        self._module = module
        self._token_label = token_label
        self._key_label = key_label
        self._closed = False
        context = self._context()
        path, lib = _load_library(module)
        pin_text = _pin_text(pin, context)
        with _translate_errors(context):
            token = _find_token(lib, token_label, slot_description, context)
            _check_mechanisms(token, context)
        self._conn = _acquire_connection(path, lib, token, pin_text, context)
        try:
            self._key, self._fingerprint = self._open_key(context)
        except BaseException:
            _release_connection(self._conn)
            raise

    def _open_key(self, context: str) -> tuple[_AesKey, str]:
        with self._conn.lock, _translate_errors(context):
            key = _find_key(self._conn.session, self._key_label, context)
            _check_key(key, context)
            mac = key.sign(FINGERPRINT_LABEL, mechanism=Mechanism.AES_CMAC)
        return key, _format_fingerprint(mac)

    # --- identity -------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """``cmac:`` + 16 hex chars of the token's AES-CMAC of :data:`FINGERPRINT_LABEL`."""
        return self._fingerprint

    @property
    def extractable(self) -> bool:
        """Always ``False``: this provider never exports the key."""
        return False

    def legacy_key(self) -> bytes | None:
        """``None``: the key bytes stay in the token (legacy rows cannot be read with it)."""
        return None

    def describe(self) -> str:
        """A human name for logs and conditions, e.g. ``pkcs11 token 'rotation' key 'kek-1'``."""
        return f"pkcs11 token {self._token_label!r} key {self._key_label!r}"

    def _context(self) -> str:
        return f"PKCS#11 module {self._module!r} {self.describe()}"

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<Pkcs11Kek module={self._module!r} token={self._token_label!r} "
                f"key={self._key_label!r}{state}>")

    # --- DEK wrapping ---------------------------------------------------------------

    def wrap(self, dek: bytes, version: int) -> bytes:
        """Wrap ``dek`` for key ``version`` in the token; same bytes as ``codec.wrap_dek``."""
        if not isinstance(dek, bytes | bytearray):
            raise TypeError("dek must be bytes")
        if len(dek) != codec.KEY_SIZE:
            raise ValueError(f"dek must be {codec.KEY_SIZE} bytes, got {len(dek)}")
        aad = codec.wrap_aad(version)
        # Writable: some tokens (AWS CloudHSM) ignore the caller's IV and write the one they
        # generated into pIv, so what is in the buffer afterwards is the IV actually used.
        nonce = bytearray(os.urandom(codec.V1.nonce_size))
        with self._operation():
            sealed = _as_bytes(self._key.encrypt(
                bytes(dek), mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(nonce, aad)))
        if len(sealed) != codec.WRAPPED_BODY_SIZE:
            raise HSMError(f"{self._context()}: the token returned a GCM result of "
                           f"{len(sealed)} bytes, expected {codec.WRAPPED_BODY_SIZE}")
        return codec.build(bytes(nonce), sealed)

    def unwrap(self, wrapped: bytes, version: int) -> bytes:
        """Unwrap the DEK of ``version``; :class:`InvalidToken` if it does not authenticate.

        As ``codec.unwrap_dek``: wrong KEK, wrong version, tampering and wrong length all
        raise the same opaque error.  A token that cannot be reached raises :class:`HSMError`.
        """
        self._check_open()
        dek = self._gcm_open(codec.parse(wrapped, size=codec.WRAPPED_SIZE),
                             codec.wrap_aad(version))
        if dek is None or len(dek) != codec.KEY_SIZE:
            raise InvalidToken()  # raised outside any except: no PKCS#11 cause attached
        return dek

    def _gcm_open(self, sealed: codec.Sealed, aad: bytes) -> bytes | None:
        """The token's AES-GCM open of a format-v1 value, ``None`` if it does not verify."""
        with self._operation():
            try:
                return _as_bytes(self._key.decrypt(
                    sealed.body, mechanism=Mechanism.AES_GCM,
                    mechanism_param=_gcm(sealed.nonce, aad)))
            except p11.PKCS11Error as exc:
                if not _is_bad_ciphertext(exc):
                    raise  # the token, not the value, failed: HSMError
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.describe()} is closed")

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """Hold the shared session's lock; turn library exceptions into :class:`HSMError`."""
        self._check_open()
        with self._conn.lock, _translate_errors(self._context()):
            yield

    # --- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Give up this handle; the shared session logs out when its last user closes."""
        if self._closed:
            return
        self._closed = True
        _release_connection(self._conn)

    def __enter__(self) -> Pkcs11Kek:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def _translate_errors(context: str) -> Iterator[None]:
    """Turn any python-pkcs11 exception into :class:`HSMError` naming its class only."""
    try:
        yield
    except p11.PKCS11Error as exc:
        raise _hsm_error(context, exc) from None
