"""Leased VMs on a worker host: libvirt domains with passed-through GPUs.

The package is a library that the worker's gateway link drives through
:class:`byteleap.worker.vm.manager.LeaseVmManager`; its modules each own one concern:

* :mod:`.config` - the ``vm:`` section of the worker configuration;
* :mod:`.domain` - the libvirt domain model and its XML;
* :mod:`.disks` - base image verification and per-lease qcow2 overlays;
* :mod:`.seed` - the cloud-init NoCloud seed ISO (renter SSH key only, no passwords);
* :mod:`.network` - per-lease bridge, address, SSH port forward and isolation rules (nftables);
* :mod:`.gpus` - handing GPUs to vfio-pci and back, and finding their companion functions;
* :mod:`.manager` - the lifecycle: start, status, stop and crash recovery.

This module holds what they share: the error type and the one way external tools are run (argv,
never a shell, always with a timeout) and the one way state files are written (0600, atomically).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

# Re-exported: the VM modules keep their lease state in private files.
from ...core.files import replace_private_file

__all__ = ["ToolError", "VmError", "replace_private_file", "run_tool"]

_STDERR_TAIL = 400


class VmError(Exception):
    """A leased-VM operation failed; the message says which step, for which lease, and why."""


class ToolError(VmError):
    """An external tool (qemu-img, genisoimage, nft, systemctl, ip) failed or timed out."""


def run_tool(
    argv: Sequence[str], *, what: str, timeout_s: float, stdin: bytes | None = None
) -> str:
    """Run ``argv`` and return its stdout; :class:`ToolError` naming ``what`` otherwise.

    The error carries the end of the tool's stderr (tools say why they failed there), squeezed
    to one line so that it fits a log line or an API error message.
    """
    try:
        done = subprocess.run(  # noqa: S603 - argv from our own code, no shell
            list(argv),
            input=stdin,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError:
        raise ToolError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: {argv[0]} did not finish within {timeout_s:g} s") from None
    except OSError as exc:
        raise ToolError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.decode("utf-8", "replace").split())
        if len(detail) > _STDERR_TAIL:
            detail = "..." + detail[-_STDERR_TAIL:]
        raise ToolError(
            f"{what}: {argv[0]} exited with status {done.returncode}"
            + (f": {detail}" if detail else "")
        )
    return done.stdout.decode("utf-8", "replace")
