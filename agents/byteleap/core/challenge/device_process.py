"""A GPU's prover in a process of its own, so that the worker can give the GPU back.

A CUDA process keeps the device nodes of every GPU it can see open until it exits: freeing its
memory pools or resetting the device does not close them, and the nvidia driver's unbind waits
for every open node. A worker that ran CuPy in its own process could therefore never hand an
idle GPU to vfio-pci for a lease (``gpu.mode: auto``). So the worker never initialises CUDA
itself: each GPU's prover runs in a child process that sees only that GPU
(``CUDA_VISIBLE_DEVICES=<uuid>``), and giving the GPU back is ending that child
(:meth:`DeviceProcess.stop`). The next challenge, or :meth:`DeviceProcess.start` when the lease
ends, starts a fresh one. A CUDA fault that poisons a context, or a hung kernel, also ends only
the child: the worker and its other GPUs carry on.

The parent and child speak length-prefixed msgpack frames over the child's stdin and stdout
(typed messages below); the child's own stdout is its stderr, so nothing a library prints can
corrupt a frame. The result C stays in the child's VRAM: the parent builds the Merkle tree
from the row hashes the child sends and asks for rows when phase 2 reveals them. Row reads and
releases are served beside a running computation, never queued behind it.

Run as ``python -m byteleap.core.challenge.device_process --backend cupy`` by the parent only.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import IO, Any, Final, Literal, NoReturn

import msgspec

from ..merkle import HASH_SIZE
from .prover import NumpyBackend, ResultMatrix
from .spec import ChallengeError, ChallengeSpec

log = logging.getLogger(__name__)

BACKENDS: Final = ("numpy", "cupy")
"""What a child can run: ``cupy`` on its one visible GPU; ``numpy`` (CPU) for tests."""

_LENGTH_BYTES: Final = 4
MAX_FRAME_BYTES: Final = 64 << 20
"""The largest frame either side accepts: the row hashes of n=65536 are 2 MiB."""

ErrorKind = Literal["challenge", "memory", "internal"]


# --------------------------------------------------------------------------------------------
# Messages (parent -> child)


class Compute(msgspec.Struct, tag=True, frozen=True):
    call: int
    spec: ChallengeSpec
    threads: int


class ReadRow(msgspec.Struct, tag=True, frozen=True):
    call: int
    challenge_id: bytes
    index: int


class Release(msgspec.Struct, tag=True, frozen=True):
    call: int
    challenge_id: bytes


Request = Compute | ReadRow | Release


# Messages (child -> parent)


class Ready(msgspec.Struct, tag=True, frozen=True):
    """The child's first frame: its backend is loaded and can compute."""

    backend: str
    pid: int
    device_name: str
    pci_bus_id: str
    """The PCI address of the one GPU the child sees ("" for numpy)."""
    visible_devices: str
    """``CUDA_VISIBLE_DEVICES`` as the child saw it: proof of which GPU it may touch."""


class StartFailed(msgspec.Struct, tag=True, frozen=True):
    message: str


class Computed(msgspec.Struct, tag=True, frozen=True):
    call: int
    leaves: bytes
    """The row hashes of C, concatenated (``HASH_SIZE`` bytes each)."""


class RowData(msgspec.Struct, tag=True, frozen=True):
    call: int
    values: bytes


class Done(msgspec.Struct, tag=True, frozen=True):
    call: int


class Failed(msgspec.Struct, tag=True, frozen=True):
    call: int
    kind: ErrorKind
    message: str


Reply = Ready | StartFailed | Computed | RowData | Done | Failed

_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


class FrameError(Exception):
    """A frame that is too large, cut short or not a message of this protocol."""


def write_frame(stream: IO[bytes], message: msgspec.Struct) -> None:
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    stream.write(len(body).to_bytes(_LENGTH_BYTES, "big") + body)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            if chunks:
                raise FrameError("the stream ended inside a frame")
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame's body; ``None`` at a clean end of stream."""
    header = _read_exactly(stream, _LENGTH_BYTES)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    body = _read_exactly(stream, size)
    if body is None:
        raise FrameError("the stream ended inside a frame")
    return body


def decode_reply(body: bytes) -> Reply:
    try:
        return _reply_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"not a prover reply: {exc}") from None


def decode_request(body: bytes) -> Request:
    try:
        return _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"not a prover request: {exc}") from None


# --------------------------------------------------------------------------------------------
# Parent side


class ProverProcessError(RuntimeError):
    """The prover process could not start, died, hung or broke the protocol."""


class DeviceProcess:
    """A prover backend (``compute``) whose work runs in a child process bound to one device.

    ``device`` is what the child may see: a GPU's NVML uuid (``GPU-...``) for ``cupy``. Every
    method blocks; call them from the device's executor thread (row reads may come from any
    thread). The child starts on first use or :meth:`start`, and :meth:`stop` ends it, which
    releases the GPU completely.
    """

    def __init__(
        self,
        backend: str,
        device: str,
        *,
        cache_dir: Path | None = None,
        start_timeout_s: float = 180.0,
        compute_timeout_s: float = 900.0,
        read_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
        python: str = sys.executable,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ChallengeError(f"unknown prover backend {backend!r} (known: numpy, cupy)")
        self.name = backend
        self.device = device
        self._cache_dir = cache_dir
        self._start_timeout = start_timeout_s
        self._compute_timeout = compute_timeout_s
        self._read_timeout = read_timeout_s
        self._stop_timeout = stop_timeout_s
        self._python = python
        self._environ = dict(os.environ if environ is None else environ)
        self._lock = threading.RLock()
        """Guards the child's lifecycle: starting, stopping and the current generation."""
        self._child: _Child | None = None
        self._ready: Ready | None = None

    # ---- lifecycle

    @property
    def pid(self) -> int | None:
        """The running child's process id; ``None`` when none runs."""
        with self._lock:
            child = self._child
            return child.process.pid if child is not None and child.alive else None

    def start(self) -> Ready:
        """Start the child unless it runs; returns its :class:`Ready` report."""
        with self._lock:
            child = self._child
            if child is not None and child.alive and self._ready is not None:
                return self._ready
            if child is not None:
                child.kill()
                self._child = None
            child = _Child.spawn(self)
            try:
                ready = child.wait_ready(self._start_timeout)
            except BaseException:
                child.kill()
                raise
            self._child, self._ready = child, ready
            log.info(
                "%s prover for %s runs as pid %d (%s%s)",
                self.name,
                self.device,
                ready.pid,
                ready.device_name,
                f" at {ready.pci_bus_id}" if ready.pci_bus_id else "",
            )
            return ready

    def stop(self) -> None:
        """End the child, and with it every hold it had on the device. Idempotent."""
        with self._lock:
            child, self._child, self._ready = self._child, None, None
        if child is not None:
            child.stop(self._stop_timeout)
            log.info("%s prover for %s stopped: the device is released", self.name, self.device)

    def _command(self) -> list[str]:
        return [self._python, "-m", __name__, "--backend", self.name]

    def environment(self) -> dict[str, str]:
        """The environment the child runs in."""
        env = dict(self._environ)
        env["CUDA_VISIBLE_DEVICES"] = self.device if self.name == "cupy" else ""
        if self._cache_dir is not None and "CUPY_CACHE_DIR" not in env:
            # The worker's home is hidden (ProtectHome=): compiled kernels go to its state dir.
            env["CUPY_CACHE_DIR"] = str(self._cache_dir)
        return env

    # ---- Backend

    def compute(self, spec: ChallengeSpec, threads: int) -> tuple[ResultMatrix, list[bytes]]:
        self.start()
        child = self._current()
        reply = child.call(
            lambda call: Compute(call=call, spec=spec, threads=threads), self._compute_timeout
        )
        if not isinstance(reply, Computed):
            raise ProverProcessError(f"prover answered a computation with {type(reply).__name__}")
        leaves = reply.leaves
        if len(leaves) != spec.n * HASH_SIZE:
            child.kill()
            raise ProverProcessError(
                f"prover sent {len(leaves)} bytes of row hashes for n={spec.n}: killed it"
            )
        hashes = [leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
        return _RemoteMatrix(child, spec.challenge_id, spec.n), hashes

    def _current(self) -> _Child:
        with self._lock:
            child = self._child
        if child is None or not child.alive:
            raise ProverProcessError(f"the {self.name} prover for {self.device} is not running")
        return child


class _RemoteMatrix:
    """C in a prover process's memory; gone with that process."""

    def __init__(self, child: _Child, challenge_id: bytes, n: int) -> None:
        self._child = child
        self._challenge_id = challenge_id
        self._n = n

    def row_bytes(self, index: int) -> bytes:
        child = self._child
        if not child.alive:
            raise ChallengeError(
                "challenge result was lost: its prover process ended (the device was released "
                "or the process failed)"
            )
        reply = child.call(
            lambda call: ReadRow(call=call, challenge_id=self._challenge_id, index=index),
            child.owner._read_timeout,
        )
        if not isinstance(reply, RowData) or len(reply.values) != 4 * self._n:
            child.kill()
            raise ProverProcessError("prover sent a malformed row: killed it")
        return reply.values

    def release(self) -> None:
        if not self._child.alive:
            return  # its memory went with the process
        try:
            self._child.call(
                lambda call: Release(call=call, challenge_id=self._challenge_id),
                self._child.owner._read_timeout,
            )
        except (ProverProcessError, ChallengeError) as exc:
            log.debug("releasing %s in the prover: %s", self._challenge_id.hex(), exc)


class _Child:
    """One prover process: its pipes, the calls waiting for replies and the thread reading them."""

    def __init__(self, owner: DeviceProcess, process: subprocess.Popen[bytes]) -> None:
        self.owner = owner
        self.process = process
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Reply]] = {}
        self._pending_lock = threading.Lock()
        self._calls = itertools.count(1)
        self._ready: Future[Ready] = Future()
        self._ended: str | None = None
        """Why the child is gone (set once, by the reader or by kill/stop)."""
        self._reader = threading.Thread(
            target=self._read_replies,
            name=f"prover-reader-{owner.device}-{process.pid}",
            daemon=True,
        )

    @classmethod
    def spawn(cls, owner: DeviceProcess) -> _Child:
        try:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
                owner._command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=owner.environment(),
                close_fds=True,
            )
        except OSError as exc:
            raise ProverProcessError(f"cannot start the prover process: {exc}") from exc
        child = cls(owner, process)
        child._reader.start()
        return child

    @property
    def alive(self) -> bool:
        return self._ended is None

    def wait_ready(self, timeout: float) -> Ready:
        try:
            return self._ready.result(timeout)
        except FutureTimeoutError:
            raise ProverProcessError(
                f"the {self.owner.name} prover for {self.owner.device} did not start within "
                f"{timeout:g} s"
            ) from None

    def call(self, make: Callable[[int], Request], timeout: float) -> Reply:
        """Send a request and wait for its reply; a child that does not answer in time is killed.

        A :class:`Failed` reply raises what the child raised: ``ChallengeError``, ``MemoryError``
        or :class:`ProverProcessError`.
        """
        future: Future[Reply] = Future()
        call = next(self._calls)
        with self._pending_lock:
            if self._ended is not None:
                raise ProverProcessError(self._ended)
            self._pending[call] = future
        try:
            with self._send_lock:
                stdin = self.process.stdin
                if stdin is None:  # pragma: no cover - always piped
                    raise ProverProcessError("the prover process has no input pipe")
                write_frame(stdin, make(call))
        except (OSError, ValueError) as exc:  # a closed pipe: the child is gone
            self._end(f"the prover process's input is closed: {exc}")
            raise ProverProcessError(self._ended or "the prover process ended") from None
        try:
            reply = future.result(timeout)
        except FutureTimeoutError:
            self.kill(f"no answer within {timeout:g} s: the prover process was killed")
            raise ProverProcessError(
                f"the {self.owner.name} prover for {self.owner.device} did not answer within "
                f"{timeout:g} s: killed it (the next challenge starts a new one)"
            ) from None
        finally:
            with self._pending_lock:
                self._pending.pop(call, None)
        if isinstance(reply, Failed):
            if reply.kind == "challenge":
                raise ChallengeError(reply.message)
            if reply.kind == "memory":
                raise MemoryError(reply.message)
            raise ProverProcessError(reply.message)
        return reply

    def _read_replies(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        reason = "the prover process closed its output"
        try:
            while True:
                body = read_frame(stdout)
                if body is None:
                    break
                reply = decode_reply(body)
                if isinstance(reply, Ready | StartFailed):
                    if self._ready.done():
                        raise FrameError("a second start report")
                    if isinstance(reply, StartFailed):
                        self._ready.set_exception(ProverProcessError(reply.message))
                    else:
                        self._ready.set_result(reply)
                    continue
                with self._pending_lock:
                    future = self._pending.get(reply.call)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (FrameError, OSError, ValueError) as exc:
            reason = f"the prover process broke the protocol ({exc}): killed it"
            self._terminate(kill=True)
        code = self._reap(self.owner._stop_timeout)
        self._end(f"{reason} (exit status {code})" if code is not None else reason)

    def _end(self, reason: str) -> None:
        with self._pending_lock:
            if self._ended is not None:
                return
            self._ended = reason
            pending = list(self._pending.values())
        if not self._ready.done():
            self._ready.set_exception(ProverProcessError(reason))
        for future in pending:
            if not future.done():
                future.set_exception(ProverProcessError(reason))

    def _terminate(self, *, kill: bool) -> None:
        try:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
        except ProcessLookupError:
            pass

    def _reap(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._terminate(kill=True)
            return self.process.wait()

    def kill(self, reason: str = "the prover process was killed") -> None:
        self._terminate(kill=True)
        self._end(reason)
        self._close_input()
        if self._reader is not threading.current_thread():
            self._reader.join(self.owner._stop_timeout)

    def stop(self, timeout: float) -> None:
        """Close the child's input (it exits on end of input) and wait; kill it if it lingers."""
        self._close_input()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s prover for %s did not exit within %g s: killing it",
                self.owner.name,
                self.owner.device,
                timeout,
            )
            self._terminate(kill=True)
            self.process.wait()
        self._end("the prover process was stopped (its device was released)")
        self._reader.join(timeout)

    def _close_input(self) -> None:
        with self._send_lock:
            stdin = self.process.stdin
            if stdin is not None and not stdin.closed:
                with contextlib.suppress(OSError):  # a broken pipe: the child is gone already
                    stdin.close()


# --------------------------------------------------------------------------------------------
# Child side


class _Prover:
    """The child's state: its backend and the results it holds, served from two threads."""

    def __init__(self, backend_name: str, out: IO[bytes]) -> None:
        self._backend_name = backend_name
        self._out = out
        self._out_lock = threading.Lock()
        self._held: dict[bytes, ResultMatrix] = {}
        self._held_lock = threading.Lock()
        self._backend: Any = None
        # Computations queue behind each other; row reads and releases never wait for them.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._serve = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows")

    def send(self, message: msgspec.Struct) -> None:
        with self._out_lock:
            write_frame(self._out, message)

    def load(self) -> Ready:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if self._backend_name == "cupy":
            from .cupy_backend import CupyBackend, device_identity

            self._backend = CupyBackend(0)
            name, address = device_identity(0)
        else:
            self._backend = NumpyBackend()
            name, address = "cpu", ""
        return Ready(
            backend=self._backend_name,
            pid=os.getpid(),
            device_name=name,
            pci_bus_id=address,
            visible_devices=visible,
        )

    def dispatch(self, request: Request) -> None:
        if isinstance(request, Compute):
            self._compute.submit(self._guarded, request.call, lambda: self._run(request))
        elif isinstance(request, ReadRow):
            self._serve.submit(self._guarded, request.call, lambda: self._row(request))
        else:
            self._serve.submit(self._guarded, request.call, lambda: self._drop(request))

    def _guarded(self, call: int, work: Callable[[], msgspec.Struct]) -> None:
        try:
            reply = work()
        except ChallengeError as exc:
            reply = Failed(call=call, kind="challenge", message=str(exc))
        except MemoryError as exc:  # CuPy's OutOfMemoryError is one
            reply = Failed(call=call, kind="memory", message=str(exc) or "out of memory")
        except Exception as exc:
            log.exception("prover request %d failed", call)
            reply = Failed(call=call, kind="internal", message=f"{type(exc).__name__}: {exc}")
        self.send(reply)

    def _run(self, request: Compute) -> Computed:
        spec = request.spec
        with self._held_lock:
            if spec.challenge_id in self._held:
                raise ChallengeError("challenge id already held by this prover")
        result, leaves = self._backend.compute(spec, max(1, request.threads))
        with self._held_lock:
            self._held[spec.challenge_id] = result
        return Computed(call=request.call, leaves=b"".join(leaves))

    def _row(self, request: ReadRow) -> RowData:
        with self._held_lock:
            result = self._held.get(request.challenge_id)
        if result is None:
            raise ChallengeError("no result held for this challenge")
        return RowData(call=request.call, values=result.row_bytes(request.index))

    def _drop(self, request: Release) -> Done:
        with self._held_lock:
            result = self._held.pop(request.challenge_id, None)
        if result is not None:
            result.release()
        return Done(call=request.call)


def _serve(backend_name: str, requests: IO[bytes], out: IO[bytes]) -> int:
    prover = _Prover(backend_name, out)
    try:
        ready = prover.load()
    except Exception as exc:
        message = f"cannot load the {backend_name} prover: {type(exc).__name__}: {exc}"
        write_frame(out, StartFailed(message=message))
        return 1
    prover.send(ready)
    while True:
        try:
            body = read_frame(requests)
            if body is None:
                return 0  # the parent closed our input: release the device by exiting
            prover.dispatch(decode_request(body))
        except FrameError as exc:
            log.error("prover: %s; exiting", exc)
            return 1


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="byteleap-prover", description=__doc__)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    args = parser.parse_args(argv)
    # Frames go to a private copy of stdout; anything printed lands on stderr (the journal).
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="prover[%(process)d] %(message)s"
    )
    code = _serve(args.backend, sys.stdin.buffer, out)
    sys.stderr.flush()
    # Exit at once: CUDA frees the device with the process; waiting for the compute thread
    # (a challenge nobody will reveal) would only hold the GPU longer.
    os._exit(code)


if __name__ == "__main__":
    main()
