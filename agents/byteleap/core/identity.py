"""Long-term identities: Ed25519 worker keys and sr25519 Bittensor hotkeys.

Every secure session (see :mod:`byteleap.core.session`) is authenticated by a long-term key:

* a worker owns an Ed25519 key kept in its state directory (:class:`WorkerKey`); its ``worker_id``
  is derived from the public key alone, so it survives kernel upgrades and NIC swaps and cannot be
  claimed by anyone who does not hold the private key;
* miners and validators sign with their sr25519 hotkey (:class:`HotkeySigner`), which
  :func:`load_hotkey` finds the same way for both: a dev URI, else the systemd credential
  ``hotkey`` (packaged units), else the standard ``~/.bittensor/wallets`` layout.

sr25519 comes from ``bittensor_core`` (the sp-core binding that ``bittensor.sp_core`` re-exports).
It is imported lazily: it costs ~8 ms against ~600 ms (and side effects in the home directory) for
``import bittensor``, and a worker that only ever uses Ed25519 never loads it at all.

Worker key file format: an unencrypted PKCS#8 PEM Ed25519 private key (``-----BEGIN PRIVATE
KEY-----``), mode 0600, i.e. exactly what ``openssl genpkey -algorithm ed25519`` writes, so
operators can inspect it with ``openssl pkey -in worker.key -pubout``.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from byteleap.core.files import PrivateFileError, read_private_file, write_new_file

__all__ = [
    "DEFAULT_WALLET_PATH",
    "HOTKEY_CREDENTIAL",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "SS58_FORMAT",
    "WORKER_ID_DOMAIN",
    "BtAuthError",
    "BtAuthVerifier",
    "HotkeySigner",
    "IdentityError",
    "IdentityKind",
    "KeyFileError",
    "LoadedHotkey",
    "PeerIdentity",
    "Signer",
    "WorkerKey",
    "add_hotkey_arguments",
    "hotkey_from_arguments",
    "load_hotkey",
    "wallet_hotkey_path",
    "worker_id_of",
]

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
WORKER_ID_DOMAIN = b"byteleap/worker-id/v1"
SS58_FORMAT = 42  # generic Substrate prefix, what Bittensor uses for every address
_SR25519 = 1  # bittensor_core crypto_type for sr25519
_MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is 119 bytes, a bittensor keyfile < 1 KiB
_PROBE_MESSAGE = b"byteleap/identity/probe"


class IdentityError(Exception):
    """An identity could not be created, loaded or used."""


class KeyFileError(IdentityError):
    """A key file is missing, unreadable, corrupted, encrypted or has unsafe permissions."""


class IdentityKind(enum.StrEnum):
    """Which signature scheme a long-term identity uses."""

    ED25519 = "ed25519"  # worker keys
    SR25519 = "sr25519"  # Bittensor hotkeys (miners, validators)


def _sp_core() -> ModuleType:
    """Import ``bittensor_core`` on first use (see the module docstring for why it is lazy)."""
    try:
        import bittensor_core
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise IdentityError("sr25519 support needs the bittensor-core package") from exc
    module: ModuleType = bittensor_core
    return module


def _all_bytes(*values: object) -> bool:
    # A runtime guard the type checker considers redundant; network input is not type-checked.
    return all(isinstance(v, bytes) for v in values)


def worker_id_of(public_key: bytes) -> str:
    """Return the worker id for an Ed25519 public key.

    ``hex(SHA-256(b"byteleap/worker-id/v1" || pub)[:16])``: 32 lowercase hex characters. The domain
    prefix keeps the id from colliding with any other hash of the same key.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError("a worker public key is exactly 32 bytes")
    return hashlib.sha256(WORKER_ID_DOMAIN + public_key).digest()[:16].hex()


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The public half of a long-term identity, as presented by a peer.

    Frozen and hashable so that callers can keep allow-lists and pins in sets and dicts.
    """

    kind: IdentityKind
    public_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, IdentityKind):
            raise ValueError(f"unknown identity kind: {self.kind!r}")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_BYTES:
            raise ValueError("an identity public key is exactly 32 bytes")

    @classmethod
    def from_ss58(cls, address: str) -> PeerIdentity:
        """The sr25519 identity of a hotkey given as an SS58 address (as the chain reports it)."""
        try:
            public_key = bytes(_sp_core().ss58_decode(address))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a valid SS58 address: {address!r}") from exc
        return cls(IdentityKind.SR25519, public_key)

    @property
    def display(self) -> str:
        """Human-readable name: the worker id for Ed25519, the SS58 address for sr25519."""
        if self.kind is IdentityKind.ED25519:
            return worker_id_of(self.public_key)
        return str(_sp_core().ss58_encode(self.public_key, SS58_FORMAT))

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.display}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is this identity's signature over ``message``.

        Never raises: any malformed input (wrong types, wrong lengths, invalid points) is simply
        not a valid signature. Callers on the network path depend on that.
        """
        if not _all_bytes(message, signature):
            return False
        if len(signature) != SIGNATURE_BYTES:
            return False
        if self.kind is IdentityKind.ED25519:
            try:
                Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
            except (InvalidSignature, ValueError):
                return False
            return True
        try:
            keypair = _sp_core().Keypair(public_key=self.public_key, crypto_type=_SR25519)
            return bool(keypair.verify(message, signature))
        except Exception:  # the Rust binding raises assorted types on bad points/lengths
            return False


@runtime_checkable
class Signer(Protocol):
    """Anything that can sign with a long-term identity (worker key, hotkey, test doubles)."""

    @property
    def identity(self) -> PeerIdentity: ...

    def sign(self, message: bytes) -> bytes: ...


class WorkerKey:
    """A worker's persistent Ed25519 identity."""

    __slots__ = ("_identity", "_private_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._identity = PeerIdentity(IdentityKind.ED25519, public)

    def __repr__(self) -> str:  # never show key material
        return f"WorkerKey(worker_id={self.worker_id!r})"

    @classmethod
    def generate(cls) -> WorkerKey:
        """A fresh key held only in memory (tests, ephemeral tools)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WorkerKey:
        """Load an existing key file, refusing unsafe permissions or a corrupted file."""
        key_path = Path(path)
        try:
            data = read_private_file(key_path, _MAX_KEY_FILE_BYTES, what="worker key file")
        except PrivateFileError as exc:
            raise KeyFileError(str(exc)) from None
        return cls(_parse_private_key(data, key_path))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> WorkerKey:
        """Load the key at ``path``, generating and persisting it first if there is none.

        Creation is atomic and never clobbers: the key is written to a 0600 temporary file in the
        same directory (``O_EXCL``), fsynced, then hard-linked into place, which fails if another
        process won the race; the loser loads the winner's key, so one host has one identity.
        """
        key_path = Path(path)
        if key_path.exists() or key_path.is_symlink():
            return cls.load(key_path)
        directory = key_path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(
                f"cannot create directory {directory} for worker key file {key_path}: "
                f"{exc.strerror or exc}"
            ) from exc
        key = cls.generate()
        try:
            created = write_new_file(key_path, key._private_bytes())
        except OSError as exc:
            raise KeyFileError(
                f"cannot write worker key file {key_path}: {exc.strerror or exc}"
            ) from exc
        return key if created else cls.load(key_path)

    def _private_bytes(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def identity(self) -> PeerIdentity:
        return self._identity

    @property
    def public_key(self) -> bytes:
        return self._identity.public_key

    @property
    def worker_id(self) -> str:
        return worker_id_of(self._identity.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


def _parse_private_key(data: bytes, key_path: Path) -> Ed25519PrivateKey:
    corrupted = (
        f"worker key file {key_path} is corrupted or not a byteleap worker key "
        "(expected an unencrypted PKCS#8 PEM Ed25519 private key)"
    )
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(corrupted) from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(corrupted)
    return private_key


class HotkeySigner:
    """Signs with a Bittensor sr25519 hotkey (miner and validator identities)."""

    __slots__ = ("_identity", "_keypair")

    def __init__(self, keypair: Any) -> None:
        """Wrap an sr25519 ``bittensor_core.Keypair`` (== ``bittensor.Keypair``) that can sign.

        Refuses a keypair of another type, without a 32-byte public key, or that cannot sign.
        """
        crypto_type = getattr(keypair, "crypto_type", None)
        if crypto_type != _SR25519:
            raise IdentityError(f"a hotkey must be sr25519 (crypto_type 1), got {crypto_type!r}")
        public_key = getattr(keypair, "public_key", None)
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
            raise IdentityError("the keypair has no 32-byte public key")
        self._keypair = keypair
        self._identity = PeerIdentity(IdentityKind.SR25519, public_key)
        # Prove we hold the matching private key now, not at the first handshake.
        try:
            probe = self.sign(_PROBE_MESSAGE)
        except Exception as exc:  # bittensor_core raises ValueError for public-only keypairs
            raise IdentityError(f"the keypair cannot sign (no private key?): {exc}") from exc
        if not self._identity.verify(_PROBE_MESSAGE, probe):
            raise IdentityError("the keypair's signature does not verify under its public key")

    def __repr__(self) -> str:
        return f"HotkeySigner({self.ss58_address!r})"

    @classmethod
    def from_uri(cls, uri: str) -> HotkeySigner:
        """Derive a dev key from a Substrate URI such as ``//Alice`` (devnet and tests only)."""
        try:
            keypair = _sp_core().Keypair.create_from_uri(uri, crypto_type=_SR25519)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"invalid key URI: {exc}") from exc
        return cls(keypair)

    @classmethod
    def from_wallet(
        cls,
        name: str,
        hotkey: str = "default",
        path: str | os.PathLike[str] = "~/.bittensor/wallets",
    ) -> HotkeySigner:
        """Load ``<path>/<name>/hotkeys/<hotkey>`` (the standard bittensor wallet layout).

        The hotkey must be unencrypted, which is bittensor's default: the daemon signs
        unattended. Encrypted coldkeys are never needed by byteleap.
        """
        key_path = wallet_hotkey_path(name, hotkey, path)
        return cls.from_keyfile(
            key_path,
            missing_hint=f"wallet {name!r}, hotkey {hotkey!r}; "
            "create it with `btcli wallet new_hotkey`",
        )

    @classmethod
    def from_keyfile(
        cls, key_path: str | os.PathLike[str], *, missing_hint: str = ""
    ) -> HotkeySigner:
        """Load one bittensor hotkey keyfile (unencrypted JSON, as btcli writes it).

        ``missing_hint`` is added to the "not found" error, to tell the operator what to do.
        """
        key_path = Path(key_path)
        try:
            with key_path.open("rb") as keyfile:
                data = keyfile.read(_MAX_KEY_FILE_BYTES + 1)
        except FileNotFoundError as exc:
            hint = f" ({missing_hint})" if missing_hint else ""
            raise KeyFileError(f"hotkey file {key_path} not found{hint}") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot read hotkey file {key_path}: {exc.strerror}") from exc
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise KeyFileError(
                f"hotkey file {key_path} is larger than {_MAX_KEY_FILE_BYTES} bytes: not a keyfile"
            )
        sp_core = _sp_core()
        try:
            encrypted = bool(sp_core.keyfile_data_is_encrypted(data))
        except Exception:  # unknown envelope: let deserialisation produce the error
            encrypted = False
        if encrypted:
            raise KeyFileError(
                f"hotkey file {key_path} is encrypted; byteleap needs an unencrypted hotkey "
                "(regenerate it without a password, or decrypt it)"
            )
        try:
            keypair = sp_core.deserialize_keypair_from_keyfile_data(data)
        except Exception as exc:  # KeyfileError, ValueError from the binding
            raise KeyFileError(f"hotkey file {key_path} is not a valid keyfile: {exc}") from exc
        try:
            return cls(keypair)
        except IdentityError as exc:
            raise KeyFileError(f"hotkey file {key_path} is unusable: {exc}") from exc

    @property
    def identity(self) -> PeerIdentity:
        return self._identity

    @property
    def ss58_address(self) -> str:
        return self._identity.display

    # public_key and crypto_type make a HotkeySigner a ``bittensor.Signer`` too, so the chain
    # adapter signs extrinsics with it without the keypair ever leaving this object.
    @property
    def public_key(self) -> bytes:
        return self._identity.public_key

    @property
    def crypto_type(self) -> int:
        return _SR25519

    def sign(self, message: bytes) -> bytes:
        return bytes(self._keypair.sign(message))

    def btauth_headers(
        self, *, method: str, path: str, receiver_ss58: str, body: bytes = b""
    ) -> dict[str, str]:
        """btauth/1 headers (``bittensor.http_auth``) for one request to ``receiver_ss58``.

        ``path`` is the request target exactly as sent (query included). Each request, retries
        included, gets a fresh nanosecond nonce, so a captured request cannot be replayed.
        """
        from bittensor import http_auth  # identity code: the one other place bittensor may load

        return http_auth.sign(
            self._keypair, method=method, path=path, body=body, receiver_ss58=receiver_ss58
        )


DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
HOTKEY_CREDENTIAL = "hotkey"
"""systemd credential name of the hotkey keyfile (``LoadCredential=hotkey:/path/to/keyfile``)."""


def wallet_hotkey_path(
    name: str, hotkey: str = "default", path: str | os.PathLike[str] = DEFAULT_WALLET_PATH
) -> Path:
    """``<path>/<name>/hotkeys/<hotkey>``: where bittensor wallets keep a hotkey.

    Names are single path components, so a wallet or hotkey name cannot point elsewhere.
    """
    for what, value in (("wallet name", name), ("hotkey name", hotkey)):
        if not value or value in (".", "..") or "/" in value or "\x00" in value:
            raise KeyFileError(f"{what} {value!r} is not a plain file name")
    return Path(path).expanduser() / name / "hotkeys" / hotkey


@dataclass(frozen=True, slots=True)
class LoadedHotkey:
    """A hotkey and where it came from (for the journal and ``byteleapctl keys``)."""

    signer: HotkeySigner
    source: str
    """``dev URI``, ``systemd credential`` or ``wallet``."""
    location: str
    """The URI or the keyfile's path."""

    def describe(self) -> str:
        return f"{self.source} {self.location}"


def add_hotkey_arguments(parser: argparse.ArgumentParser) -> None:
    """The hotkey options every hotkey-signing daemon takes (see :func:`hotkey_from_arguments`)."""
    parser.add_argument(
        "--hotkey-uri",
        help="derive the hotkey from a dev URI such as //Alice (devnets and tests only)",
    )
    parser.add_argument("--wallet-name", default="default", help="bittensor wallet name")
    parser.add_argument("--wallet-hotkey", default="default", help="hotkey name in the wallet")
    parser.add_argument(
        "--wallet-path", default=DEFAULT_WALLET_PATH, help="bittensor wallets directory"
    )


def hotkey_from_arguments(args: argparse.Namespace) -> LoadedHotkey:
    """:func:`load_hotkey` with the options of :func:`add_hotkey_arguments`."""
    return load_hotkey(
        uri=args.hotkey_uri,
        wallet_name=args.wallet_name,
        wallet_hotkey=args.wallet_hotkey,
        wallet_path=args.wallet_path,
    )


def load_hotkey(
    *,
    uri: str | None = None,
    wallet_name: str = "default",
    wallet_hotkey: str = "default",
    wallet_path: str | os.PathLike[str] = DEFAULT_WALLET_PATH,
    credential: str = HOTKEY_CREDENTIAL,
    environ: Mapping[str, str] | None = None,
) -> LoadedHotkey:
    """The hotkey a miner or validator signs with, from the first source that applies:

    1. ``uri``: a dev URI such as ``//Alice`` (devnets and tests);
    2. the systemd credential ``credential`` (``$CREDENTIALS_DIRECTORY/hotkey``, which packaged
       units fill with ``LoadCredential=hotkey:/path/to/keyfile``): a bittensor hotkey keyfile;
    3. the wallet layout ``<wallet_path>/<wallet_name>/hotkeys/<wallet_hotkey>``.

    Raises :class:`KeyFileError` naming the file for a missing, encrypted, oversized or
    malformed keyfile, :class:`IdentityError` for a bad URI. Key material is never in a message.
    """
    if uri:
        return LoadedHotkey(HotkeySigner.from_uri(uri), "dev URI", uri)
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / credential
        if candidate.exists() or candidate.is_symlink():
            signer = HotkeySigner.from_keyfile(candidate)
            return LoadedHotkey(signer, "systemd credential", str(candidate))
    key_path = wallet_hotkey_path(wallet_name, wallet_hotkey, wallet_path)
    hint = (
        f"wallet {wallet_name!r}, hotkey {wallet_hotkey!r}; create it with `btcli wallet "
        f"new_hotkey`, or give the service the keyfile as the systemd credential {credential!r}"
    )
    signer = HotkeySigner.from_keyfile(key_path, missing_hint=hint)
    return LoadedHotkey(signer, "wallet", str(key_path))


class BtAuthError(IdentityError):
    """A request's btauth/1 headers were refused; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BtAuthVerifier:
    """Checks btauth/1-signed requests addressed to ``self_ss58`` (one per listening agent).

    It keeps the replay set (hotkey, nonce) for ``max_age`` + skew, so one verifier must serve
    every request of the process. Stake or registration checks are the caller's job.
    """

    def __init__(self, self_ss58: str, *, max_age: float = 10.0, allowed_skew: float = 2.0) -> None:
        from bittensor import http_auth

        self._http_auth = http_auth
        self._self = self_ss58
        self._max_age = max_age
        self._skew = allowed_skew
        self._nonces = http_auth.InMemoryNonceStore(retention=max_age + allowed_skew + 1.0)

    def verify(
        self, headers: Mapping[str, str], *, method: str, path: str, body: bytes = b""
    ) -> str:
        """The caller's ss58 hotkey, or :class:`BtAuthError` (401 unsigned/bad, 403 replayed or
        addressed to someone else)."""
        auth = self._http_auth
        try:
            caller = auth.verify(
                headers,
                body,
                method=method,
                path=path,
                self_hotkey_ss58=self._self,
                max_age=self._max_age,
                allowed_skew=self._skew,
                require_receiver=True,
                nonce_store=self._nonces,
            )
        except auth.WrongReceiver as exc:
            raise BtAuthError(403, f"request addressed to another hotkey: {exc}") from None
        except auth.ReplayedRequest:
            raise BtAuthError(403, "replayed request (nonce already seen)") from None
        except auth.StaleRequest as exc:
            raise BtAuthError(401, f"stale request (check the clocks): {exc}") from None
        except auth.BadSignature:
            raise BtAuthError(401, "bad btauth/1 signature") from None
        except auth.AuthError as exc:  # MalformedAuth and any future refusal
            raise BtAuthError(401, f"missing or malformed btauth/1 headers: {exc}") from None
        return str(caller.hotkey_ss58)
