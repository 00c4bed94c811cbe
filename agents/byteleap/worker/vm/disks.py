"""Disks of leased VMs: the verified base image and one qcow2 overlay per lease.

The base image is trusted only after its SHA-256 matches ``vm.base_image_sha256``. Hashing a
multi-gigabyte image takes a while, so the verdict is remembered (in memory and in a 0600 file in
the worker's state directory) together with the file's size, mtime and inode: any of them
changing means the file changed and it is hashed again. The image must also be a plain qcow2
without a backing file of its own (a backing file would let a crafted image pull in any file
QEMU can read).

Each lease boots from its own overlay, ``qemu-img create -f qcow2 -F qcow2 -b <base> <overlay>``:
writes land in the overlay, the base stays untouched and is shared by every lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from . import VmError, replace_private_file, run_tool

__all__ = [
    "GIB",
    "BaseImage",
    "VerifiedBase",
    "create_overlay",
    "make_lease_dir",
    "remove_lease_dir",
]

log = logging.getLogger(__name__)

GIB: Final = 1024**3
LEASE_DIR_MODE: Final = 0o711  # QEMU (another user) traverses it; the files are relabelled
_VERDICT_VERSION: Final = 1
_MAX_VERDICT_BYTES: Final = 4096


@dataclass(frozen=True)
class VerifiedBase:
    """A base image whose hash matched, with its virtual size in bytes."""

    path: Path
    virtual_size: int


class _Verdict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: int
    path: str
    sha256: str
    size: int
    mtime_ns: int
    inode: int
    virtual_size: int


class BaseImage:
    """The configured base image; :meth:`verify` before every overlay (cheap once verified).

    Blocking (hashing, qemu-img): call from a thread.
    """

    def __init__(
        self, path: Path, sha256: str, *, verdict_file: Path, tool_timeout_s: float
    ) -> None:
        self.path = path
        self.sha256 = sha256.lower()
        self.verdict_file = verdict_file
        self.tool_timeout_s = tool_timeout_s
        self._lock = threading.Lock()
        self._verdict: _Verdict | None = None

    def verify(self) -> VerifiedBase:
        """The image if its hash matches and it is a standalone qcow2; :class:`VmError` else."""
        with self._lock:
            try:
                info = self.path.stat()
            except FileNotFoundError:
                raise VmError(f"base image {self.path} does not exist") from None
            except OSError as exc:
                raise VmError(f"base image {self.path}: {exc.strerror or exc}") from None
            cached = self._verdict or self._load_verdict()
            if cached is not None and self._matches(cached, info):
                self._verdict = cached
                return VerifiedBase(self.path, cached.virtual_size)
            self._verdict = None
            digest = self._hash()
            if digest != self.sha256:
                raise VmError(
                    f"base image {self.path} has SHA-256 {digest}, not the configured "
                    f"vm.base_image_sha256 {self.sha256}: refusing to boot it"
                )
            virtual_size = self._inspect()
            after = self.path.stat()
            if (after.st_size, after.st_mtime_ns, after.st_ino) != (
                info.st_size,
                info.st_mtime_ns,
                info.st_ino,
            ):
                raise VmError(f"base image {self.path} changed while it was being verified")
            verdict = _Verdict(
                version=_VERDICT_VERSION,
                path=str(self.path),
                sha256=self.sha256,
                size=info.st_size,
                mtime_ns=info.st_mtime_ns,
                inode=info.st_ino,
                virtual_size=virtual_size,
            )
            self._verdict = verdict
            self._store_verdict(verdict)
            log.info("base image %s verified (SHA-256 %s)", self.path, self.sha256)
            return VerifiedBase(self.path, virtual_size)

    def _matches(self, verdict: _Verdict, info: os.stat_result) -> bool:
        return (
            verdict.version == _VERDICT_VERSION
            and verdict.path == str(self.path)
            and verdict.sha256 == self.sha256
            and verdict.size == info.st_size
            and verdict.mtime_ns == info.st_mtime_ns
            and verdict.inode == info.st_ino
        )

    def _hash(self) -> str:
        try:
            with self.path.open("rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise VmError(f"cannot read base image {self.path}: {exc.strerror or exc}") from None

    def _inspect(self) -> int:
        out = run_tool(
            ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(self.path)],
            what=f"inspecting base image {self.path}",
            timeout_s=self.tool_timeout_s,
        )
        try:
            info: Any = json.loads(out)
        except ValueError:
            raise VmError(f"qemu-img info on {self.path} printed no JSON") from None
        if not isinstance(info, dict) or info.get("format") != "qcow2":
            raise VmError(f"base image {self.path} is not a qcow2 image")
        if "backing-filename" in info:
            raise VmError(
                f"base image {self.path} has a backing file of its own "
                f"({info['backing-filename']!r:.100}): flatten it with qemu-img convert"
            )
        size = info.get("virtual-size")
        if not isinstance(size, int) or size <= 0:
            raise VmError(f"base image {self.path} reports no virtual size")
        return size

    def _load_verdict(self) -> _Verdict | None:
        try:
            data = self.verdict_file.read_bytes()[: _MAX_VERDICT_BYTES + 1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring base image verdict %s: %s", self.verdict_file, exc)
            return None
        try:
            return msgspec.json.decode(data, type=_Verdict)
        except msgspec.DecodeError:
            log.warning("ignoring unreadable base image verdict %s", self.verdict_file)
            return None

    def _store_verdict(self, verdict: _Verdict) -> None:
        try:
            self.verdict_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            replace_private_file(self.verdict_file, msgspec.json.encode(verdict))
        except OSError as exc:  # the verdict is an optimisation: hash again next time
            log.warning("cannot store base image verdict %s: %s", self.verdict_file, exc)


def make_lease_dir(vm_dir: Path, lease_id: str) -> Path:
    """``<vm_dir>/<lease_id>``, created empty (mode 0711); :class:`VmError` if it exists."""
    lease_dir = vm_dir / lease_id
    try:
        vm_dir.mkdir(mode=LEASE_DIR_MODE, parents=True, exist_ok=True)
        lease_dir.mkdir(mode=LEASE_DIR_MODE)
        lease_dir.chmod(LEASE_DIR_MODE)  # exact, whatever the umask
    except FileExistsError:
        raise VmError(f"lease directory {lease_dir} already exists") from None
    except OSError as exc:
        raise VmError(f"cannot create lease directory {lease_dir}: {exc.strerror}") from None
    return lease_dir


def create_overlay(
    base: VerifiedBase, overlay: Path, size_gib: int, *, tool_timeout_s: float
) -> None:
    """A new qcow2 overlay of ``size_gib`` GiB over ``base`` at ``overlay``."""
    if not 1 <= size_gib <= 65536:
        raise VmError(f"disk size must be within 1..65536 GiB, got {size_gib}")
    if size_gib * GIB < base.virtual_size:
        raise VmError(
            f"disk size {size_gib} GiB is smaller than the base image "
            f"({base.virtual_size / GIB:.1f} GiB): the gateway's leases.disk_gib_per_gpu is too "
            "small for this image"
        )
    if overlay.exists() or overlay.is_symlink():  # qemu-img would silently overwrite it
        raise VmError(f"overlay {overlay} already exists")
    run_tool(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(base.path.absolute()),
            str(overlay),
            f"{size_gib}G",
        ],
        what=f"creating overlay {overlay}",
        timeout_s=tool_timeout_s,
    )


def remove_lease_dir(lease_dir: Path) -> None:
    """Remove a lease's folder and everything in it; nothing when it is already gone.

    Only plain files are expected there (overlay, seed, console log); anything else is left in
    place and reported, never followed.
    """
    try:
        entries = list(os.scandir(lease_dir))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VmError(f"cannot list lease directory {lease_dir}: {exc.strerror}") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            raise VmError(f"lease directory {lease_dir} holds an unexpected folder {entry.name}")
        try:
            Path(entry.path).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise VmError(f"cannot remove {entry.path}: {exc.strerror}") from None
    try:
        lease_dir.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise VmError(f"cannot remove lease directory {lease_dir}: {exc.strerror}") from None
