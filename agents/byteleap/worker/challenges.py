"""Running challenges on the worker: off the event loop, one per device, never stuck busy.

ByteLeap's worker could stay "busy" forever after a failed task. Here a device is busy exactly
while its computation runs (un-busied by the computation's own completion, even when the caller
gave up at the deadline), every refusal is a typed ``ChallengeRefusedError`` (the caller answers
with a wire ``Error``), and results are kept only until they are revealed and released, or until
their time to live runs out (``sweep``).

Work runs in a per-device single-thread executor: numpy's BLAS and hashlib release the GIL, so the
event loop keeps serving heartbeats and systemd watchdog pings while a device computes. Freeing a
result also runs there (freeing device memory waits for the GPU), after any computation on the
same device. The table of held results is only touched from the event loop's thread: every
method is meant to be called there, and only the reading of revealed rows goes to a thread
(:meth:`ChallengeRunner.reveal_off_loop`).

A GPU handed to a lease leaves challenge duty first (:meth:`ChallengeRunner.withdraw`): new
challenges on it are refused with ``DEVICE_LEASED``, the computation running on it is waited for,
every result held in its memory is freed and its prover process is ended
(:class:`HeldDevice`), so nothing of ours holds the GPU when it moves to vfio-pci.
:meth:`ChallengeRunner.restore` takes it back after the lease and starts its prover again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import msgspec

from ..core import wire
from ..core.challenge import ChallengeError, ChallengeSpec, ProvenChallenge, prove
from ..core.challenge.prover import Backend

log = logging.getLogger(__name__)


class ChallengeRefusedError(wire.CodedError):
    """A challenge or reveal that the worker will not (or can no longer) serve."""


@runtime_checkable
class HeldDevice(Protocol):
    """A backend that holds its device while it runs (a GPU prover process): ``stop`` lets go.

    Both block; the runner calls them in the device's executor, after its queued work.
    """

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Device(msgspec.Struct, frozen=True):
    """A device that can run challenges: its uuid, prover backend and supported precisions."""

    uuid: str
    backend: Backend
    precisions: frozenset[str]


class _Held(msgspec.Struct):
    proof: ProvenChallenge
    expires_at: float


class ChallengeRunner:
    def __init__(
        self,
        worker_id: str,
        devices: list[Device],
        *,
        max_n: int,
        result_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        prover: Callable[[ChallengeSpec, Backend], ProvenChallenge] | None = None,
    ) -> None:
        self._worker_id = worker_id
        self._devices = {d.uuid: d for d in devices}
        self._max_n = max_n
        self._ttl = result_ttl_s
        self._clock = clock
        self._prove = prover or (lambda spec, backend: prove(spec, backend))
        self._busy: set[str] = set()
        self._leased: set[str] = set()
        self._running: dict[str, int] = {}
        """Device -> run() calls in progress on it (a result may still be stored)."""
        self._held: dict[bytes, _Held] = {}
        self._executors = {
            uuid: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"challenge-{uuid}")
            for uuid in self._devices
        }

    @property
    def device_uuids(self) -> list[str]:
        return sorted(self._devices)

    @property
    def busy_devices(self) -> frozenset[str]:
        return frozenset(self._busy)

    @property
    def held_results(self) -> int:
        return len(self._held)

    @property
    def leased_devices(self) -> frozenset[str]:
        """Devices withdrawn from challenge duty for a lease."""
        return frozenset(self._leased)

    async def withdraw(self, uuids: Iterable[str]) -> None:
        """Take these devices off challenge duty for a lease (before its VM gets them).

        From now on a challenge on one of them is refused with ``DEVICE_LEASED``; this returns
        once the computations on them have ended and the results held on them are freed.
        Devices this runner does not challenge are ignored.
        """
        targets = {uuid for uuid in uuids if uuid in self._devices}
        self._leased |= targets
        if not targets:
            return
        # A computation may outlive its caller (deadline): wait until none runs on a target and
        # no caller is still about to store a result, then free what is held there.
        while targets & self._busy or any(self._running.get(uuid) for uuid in targets):
            await self._drain(targets)
            await asyncio.sleep(0)
        for challenge_id in [
            cid for cid, held in self._held.items() if held.proof.spec.device_uuid in targets
        ]:
            self.release(challenge_id)
        await self._drain(targets)  # the frees run in the devices' executors
        await self._let_go(targets)
        log.info("device(s) %s left challenge duty for a lease", ", ".join(sorted(targets)))

    async def _let_go(self, uuids: set[str]) -> None:
        """End the provers that hold these devices (in their executors, after queued work)."""
        loop = asyncio.get_running_loop()
        stopping: dict[str, asyncio.Future[None]] = {}
        for uuid, holder in self._holders(uuids):
            try:
                stopping[uuid] = loop.run_in_executor(self._executors[uuid], holder.stop)
            except RuntimeError:  # closed runner: close() stopped it already
                continue
        outcomes = await asyncio.gather(*stopping.values(), return_exceptions=True)
        for uuid, outcome in zip(stopping, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # The bind that follows names whoever still holds the GPU (vfio-setup).
                log.error("could not end the prover of %s before its lease: %s", uuid, outcome)

    def restore(self, uuids: Iterable[str]) -> None:
        """Put devices back on challenge duty after their lease ended.

        Their provers start again in the background, so the next challenge does not pay for it;
        one that fails to start is retried by that challenge.
        """
        back = self._leased & set(uuids)
        self._leased -= back
        for uuid, holder in self._holders(back):
            with contextlib.suppress(RuntimeError):  # a closed runner starts nothing
                self._executors[uuid].submit(_warm_up, uuid, holder)
        if back:
            log.info("device(s) %s back on challenge duty", ", ".join(sorted(back)))

    def _holders(self, uuids: Iterable[str]) -> list[tuple[str, HeldDevice]]:
        """The devices among ``uuids`` whose backend holds its device while it runs."""
        return [
            (uuid, backend)
            for uuid in sorted(uuids)
            if isinstance(backend := self._devices[uuid].backend, HeldDevice)
        ]

    async def _drain(self, uuids: set[str]) -> None:
        """Wait for what the devices' executors were given so far (each is one thread, FIFO)."""
        loop = asyncio.get_running_loop()
        barriers = []
        for uuid in uuids:
            try:
                barriers.append(loop.run_in_executor(self._executors[uuid], _nothing))
            except RuntimeError:  # closed runner: nothing runs any more
                continue
        await asyncio.gather(*barriers)

    def _spec(self, req: wire.ChallengeRequest) -> tuple[Device, ChallengeSpec]:
        device = self._devices.get(req.device_uuid)
        if device is None:
            raise ChallengeRefusedError(
                wire.ErrorCode.DEVICE_UNKNOWN, f"no device {req.device_uuid!r} on this worker"
            )
        if device.uuid in self._leased:
            raise ChallengeRefusedError(
                wire.ErrorCode.DEVICE_LEASED, f"device {device.uuid} is leased"
            )
        if req.n > self._max_n:
            raise ChallengeRefusedError(
                wire.ErrorCode.CHALLENGE_INVALID,
                f"matrix size {req.n} exceeds this worker's limit of {self._max_n}",
            )
        if req.precision not in device.precisions:
            raise ChallengeRefusedError(
                wire.ErrorCode.CHALLENGE_INVALID,
                f"device {req.device_uuid} does not compute in {req.precision}",
            )
        if req.challenge_id in self._held:
            raise ChallengeRefusedError(
                wire.ErrorCode.CHALLENGE_INVALID, "challenge id already used"
            )
        try:
            spec = req.spec(self._worker_id)
        except ChallengeError as exc:
            raise ChallengeRefusedError(wire.ErrorCode.CHALLENGE_INVALID, str(exc)) from None
        return device, spec

    async def run(self, req: wire.ChallengeRequest) -> wire.ChallengeCommit:
        """Compute and commit; the result is held for ``reveal`` until released or expired.

        Past ``req.deadline_ms`` this raises ``CHALLENGE_EXPIRED`` at once; the computation
        cannot be interrupted, so the device stays busy until it really ends, and its late
        result is then freed.
        """
        device, spec = self._spec(req)
        uuid = device.uuid
        if uuid in self._busy:
            raise ChallengeRefusedError(wire.ErrorCode.DEVICE_BUSY, f"device {uuid} is busy")
        self._busy.add(uuid)
        self._running[uuid] = self._running.get(uuid, 0) + 1
        try:
            return await self._compute(req, device, spec)
        finally:
            self._running[uuid] -= 1
            if not self._running[uuid]:
                del self._running[uuid]

    async def _compute(
        self, req: wire.ChallengeRequest, device: Device, spec: ChallengeSpec
    ) -> wire.ChallengeCommit:
        uuid = device.uuid
        started = self._clock()
        future = asyncio.get_running_loop().run_in_executor(
            self._executors[uuid], self._prove, spec, device.backend
        )
        future.add_done_callback(lambda _: self._busy.discard(uuid))
        try:
            proof = await asyncio.wait_for(asyncio.shield(future), req.deadline_ms / 1000)
        except TimeoutError:
            future.add_done_callback(self._free_late_result)
            raise ChallengeRefusedError(
                wire.ErrorCode.CHALLENGE_EXPIRED,
                f"challenge took longer than its {req.deadline_ms} ms deadline",
            ) from None
        except asyncio.CancelledError:
            future.add_done_callback(self._free_late_result)
            raise
        except MemoryError:
            raise ChallengeRefusedError(
                wire.ErrorCode.CHALLENGE_INVALID, f"not enough memory for n={req.n}"
            ) from None
        except Exception as exc:
            log.exception("challenge on %s failed", uuid)
            raise ChallengeRefusedError(
                wire.ErrorCode.INTERNAL, f"challenge failed: {exc}"
            ) from None
        finally:
            if future.done():  # else the done callback un-busies it when the thread ends
                self._busy.discard(uuid)
        if uuid in self._leased:  # leased meanwhile: the GPU goes to a VM, the result goes
            self._free(proof)
            raise ChallengeRefusedError(
                wire.ErrorCode.DEVICE_LEASED, f"device {uuid} was leased during the challenge"
            )
        elapsed_ms = int((self._clock() - started) * 1000)
        self._held[req.challenge_id] = _Held(proof=proof, expires_at=self._clock() + self._ttl)
        return wire.ChallengeCommit(
            challenge_id=req.challenge_id,
            device_uuid=req.device_uuid,
            merkle_root=proof.root,
            elapsed_ms=min(elapsed_ms, 2**32 - 1),
        )

    def _free_late_result(self, future: asyncio.Future[ProvenChallenge]) -> None:
        """Done callback of a computation nobody waits for any more: free its result."""
        if future.cancelled() or future.exception() is not None:
            return
        self._free(future.result())

    def reveal(self, req: wire.RevealRequest) -> wire.ChallengeReveal:
        """The requested rows with their Merkle paths, all computed in the calling thread."""
        return self._reveal_rows(req, self._revealable(req))

    async def reveal_off_loop(self, req: wire.RevealRequest) -> wire.ChallengeReveal:
        """:meth:`reveal`, with the rows read (maybe from device memory) and hashed in a thread.

        The held result is looked up (and an expired one released) here, on the event loop.
        """
        proof = self._revealable(req)
        return await asyncio.to_thread(self._reveal_rows, req, proof)

    def _revealable(self, req: wire.RevealRequest) -> ProvenChallenge:
        held = self._held.get(req.challenge_id)
        if held is None or held.proof.spec.device_uuid != req.device_uuid:
            raise ChallengeRefusedError(
                wire.ErrorCode.CHALLENGE_UNKNOWN, "no result held for this challenge and device"
            )
        if held.expires_at <= self._clock():
            self.release(req.challenge_id)
            raise ChallengeRefusedError(wire.ErrorCode.CHALLENGE_EXPIRED, "result already expired")
        return held.proof

    @staticmethod
    def _reveal_rows(req: wire.RevealRequest, proof: ProvenChallenge) -> wire.ChallengeReveal:
        try:
            rows = proof.reveal(req.rows)
        except ChallengeError as exc:
            raise ChallengeRefusedError(wire.ErrorCode.CHALLENGE_INVALID, str(exc)) from None
        return wire.ChallengeReveal(
            challenge_id=req.challenge_id,
            device_uuid=req.device_uuid,
            rows=[wire.RevealedRow(index=r.index, values=r.values, path=r.path) for r in rows],
        )

    def release(self, challenge_id: bytes) -> bool:
        """Forget a held result and free its memory (in its device's executor)."""
        held = self._held.pop(challenge_id, None)
        if held is None:
            return False
        self._free(held.proof)
        return True

    def sweep(self) -> int:
        """Free results past their time to live; returns how many."""
        now = self._clock()
        expired = [cid for cid, h in self._held.items() if h.expires_at <= now]
        for cid in expired:
            self.release(cid)
        return len(expired)

    def _free(self, proof: ProvenChallenge) -> None:
        """``proof.release()`` in its device's executor: freeing GPU memory waits for the GPU."""
        executor = self._executors.get(proof.spec.device_uuid)
        if executor is not None:
            try:
                executor.submit(_release, proof)
            except RuntimeError:  # the runner is closed: no executor left, free it here
                pass
            else:
                return
        _release(proof)

    def close(self) -> None:
        """Free every held result and end the provers; the executors end after their queued work
        (without waiting here; a prover also exits by itself when its worker does)."""
        for cid in list(self._held):
            self.release(cid)
        for uuid, holder in self._holders(self._executors):
            self._executors[uuid].submit(holder.stop)
        for executor in self._executors.values():
            executor.shutdown(wait=False)


def _nothing() -> None:
    """The empty job :meth:`ChallengeRunner._drain` queues behind a device's work."""


def _warm_up(uuid: str, backend: HeldDevice) -> None:
    try:
        backend.start()
    except Exception as exc:  # the next challenge on it tries again, and says why it failed
        log.warning("the prover of %s did not start after its lease: %s", uuid, exc)


def _release(proof: ProvenChallenge) -> None:
    try:
        proof.release()
    except Exception:  # nobody waits for this: log it, never lose it silently
        log.exception("freeing the result of challenge %s failed", proof.spec.challenge_id.hex())
