"""Model versions at run time: the admin API's changes, new versions picked up from disk, every worker in step.

Each model has a desired state (:class:`service.runtime.registry.Desired`: a pinned version or the newest, a
canary split, versions loaded for direct calls). The admin routes (service/api/admin.py) change it;
:class:`Control` applies it with :meth:`Registry.reconcile`. With several worker processes the desired state
is one JSON file under ``SERVE_CONTROL_DIR``: the worker that takes an admin call writes it (under a file
lock), every worker polls it and applies each new generation, and each writes a report of its versions beside
it, so an admin call returns once every worker has switched (or says which did not) and ``GET /admin/models``
shows all. Admin calls run one at a time (:meth:`Control.exclusive`), so each answer describes what that call
did.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from service.errors import ServiceError
from service.runtime.registry import Desired, Registry

log = logging.getLogger("service.runtime.control")

DESIRED = "desired.json"
LOCK = "desired.lock"
SYNC_POLL_S = 0.2  # how often a worker looks for a new generation of the desired state
SYNC_TIMEOUT_S = 120  # how long an admin call waits for the other workers to apply it
REPORT_S = 1.0  # how often a worker rewrites its report: another worker's figures on /admin/models are this old


class Control:
    """Applies desired model versions in this process and keeps it in step with the other workers."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.folder: Path | None = registry.settings.control_dir
        self.generation = 0  # of the desired state this process has applied
        self._task: asyncio.Task | None = None
        self._admin = asyncio.Lock()

    # -- the shared file -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self):
        """Hold for a whole admin operation (change, wait for the workers, check, revert): in this process and,
        by a file lock, across workers, so that calls at once cannot undo or misreport each other's changes.
        The file lock is polled, never waited on, as a blocking wait would stop this worker's event loop."""
        async with self._admin:
            if self.folder is None:
                yield
                return
            with open(self.folder / LOCK, "a") as handle:  # noqa: ASYNC230 - a local, empty file: opens at once
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(SYNC_POLL_S / 4)
                try:
                    await self._sync()  # start from the last call's state, even if it timed out here
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def _shared(self) -> Path:
        """The control folder, for the methods called only when there is one (several workers)."""
        assert self.folder is not None
        return self.folder

    def _read(self) -> dict:
        try:
            return json.loads((self._shared / DESIRED).read_text())
        except (OSError, ValueError):
            return {"generation": 0, "models": {}, "retry": {}}

    def _write(self, state: dict) -> None:
        temporary = self._shared / f".{DESIRED}.{os.getpid()}"
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self._shared / DESIRED)  # readers see the old file or the new one, never half

    def _report_path(self, pid: int) -> Path:
        return self._shared / f"worker-{pid}.json"

    def _write_report(self) -> None:
        if self.folder is None:
            return
        path = self._report_path(os.getpid())
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.report()))
        os.replace(temporary, path)

    def report(self) -> dict:
        """This process's versions: what /admin/models shows for it."""
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "updated": time.time(),
            "models": {name: entry.status() for name, entry in self.registry.entries.items()},
        }

    def reports(self) -> list[dict]:
        """Every live worker's report (this one's fresh); a dead worker's report is removed."""
        if self.folder is None:
            return [self.report()]
        found = {os.getpid(): self.report()}
        for path in self.folder.glob("worker-*.json"):
            pid = int(path.stem.split("-")[1])
            if pid in found:
                continue
            try:
                os.kill(pid, 0)
                found[pid] = json.loads(path.read_text())
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except (OSError, ValueError):
                continue  # being replaced right now: next time
        return [found[pid] for pid in sorted(found)]

    # -- applying ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Catch up with the shared state (a worker that replaced a dead one), then watch it and the disk."""
        if self.folder is not None:
            await self._sync()
        if self.registry.settings.model_poll_s:
            await self._scan()  # the other workers have scanned the disk since start-up: catch up with them
        else:
            await self.registry.reconcile()  # the split's and the extra versions, beside the one loaded first
            self._write_report()
        if self.folder is not None or self.registry.settings.model_poll_s:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="model-versions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.folder is not None:
            self._report_path(os.getpid()).unlink(missing_ok=True)

    async def _sync(self) -> None:
        """Apply the shared desired state if another worker changed it."""
        state = self._read()
        if state["generation"] <= self.generation:
            return
        for name, desired in state["models"].items():
            if (entry := self.registry.entries.get(name)) is not None:
                shared = Desired(**desired)
                shared.consider(entry.desired.newest)  # this worker's own scan may have seen a newer one
                entry.desired = shared
        retry = frozenset(v for versions in state.get("retry", {}).values() for v in versions)
        await self.registry.reconcile(retry=retry)
        self.generation = state["generation"]
        self._write_report()

    async def _watch(self) -> None:
        poll_s = self.registry.settings.model_poll_s
        next_scan = time.monotonic() + (poll_s or 0)
        next_report = time.monotonic() + REPORT_S
        while True:
            await asyncio.sleep(min(SYNC_POLL_S, poll_s or SYNC_POLL_S))
            try:
                if self.folder is not None:
                    await self._sync()
                    if time.monotonic() >= next_report:  # its live figures (drift, shadows) for the others to show
                        self._write_report()
                        next_report = time.monotonic() + REPORT_S
                if poll_s and time.monotonic() >= next_scan:
                    await self._scan()
                    next_scan = time.monotonic() + poll_s
            except Exception:  # never let the watcher die: the next pass tries again
                log.exception("applying model versions failed")

    async def _scan(self) -> None:
        """New versions on disk (SERVE_MODEL_POLL_S): the newest that loads serves, where not pinned."""
        for entry in self.registry.entries.values():
            entry.desired.consider(entry.newest_on_disk())
        await self.registry.reconcile()
        self._write_report()

    async def change(self, name: str, edit: Callable[[Desired], None], retry: frozenset[str] = frozenset()) -> None:
        """Edit one model's desired state, apply it here, and wait for every other worker to apply it. Call it
        inside :meth:`exclusive`."""
        entry = self.registry.entries[name]
        if self.folder is None:
            edit(entry.desired)
            await self.registry.reconcile([name], retry)
            return
        state = self._read()
        desired = Desired(**state["models"].get(name, asdict(entry.desired)))
        edit(desired)
        state["models"][name] = asdict(desired)
        state["generation"] += 1
        state["retry"] = {name: sorted(retry)}
        self._write(state)
        await self._sync()
        await self._wait_for_workers(state["generation"])

    async def _wait_for_workers(self, generation: int) -> None:
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while time.monotonic() < deadline:
            behind = [r["pid"] for r in self.reports() if r["generation"] < generation]
            if not behind:
                return
            await asyncio.sleep(SYNC_POLL_S / 2)
        raise ServiceError(
            f"worker processes {behind} have not applied the change within {SYNC_TIMEOUT_S} s; "
            "GET /admin/models shows each worker's versions",
            504,
        )
