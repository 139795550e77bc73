"""The admin API (``/admin/models...``): which versions of each model serve, changed while the server runs.

On only when SERVE_ADMIN_KEYS is set, and only for those keys (the middleware checks them). Each change is
applied by :class:`service.runtime.control.Control`, in every worker process, one call at a time.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from service.artifacts import VERSION_NAME
from service.runtime.control import Control
from service.runtime.registry import Desired, ModelEntry, Registry
from service.runtime.rollouts import Guard
from service.settings import SplitWeight


class VersionBody(BaseModel):
    version: str | None = Field(
        None,
        pattern=f"^{VERSION_NAME.pattern}$",
        description=(
            "A version's name (its folder under artifacts/<model>/). POST load: omitted means look for new versions "
            "and serve the newest (when not pinned); PUT default: omitted or null means serve the newest again."
        ),
    )


class SplitBody(BaseModel):
    guard: Guard | None = Field(
        None,
        description=(
            "Let the server judge the canary: it ends the split on its own (pinning the version with the largest "
            "weight) when a guard is crossed over the window, or pins the canary after promote_after_s."
        ),
        examples=[{"max_error_ratio": 0.02, "max_p99_ratio": 1.5, "min_agreement": 0.9, "window_s": 30}],
    )
    weights: dict[str, SplitWeight] = Field(
        description=(
            'Version name -> weight (whole numbers from 1 to 1,000,000, shares of the total), e.g. {"A": 90, "B": '
            "10}; {} ends the split (the default version takes all)."
        ),
        examples=[{"2026.11.25.123948": 90, "2026.11.26.090000": 10}],
    )


class ShadowBody(BaseModel):
    version: str | None = Field(
        None,
        pattern=f"^{VERSION_NAME.pattern}$",
        description="The version to mirror requests to (loaded if it is not); null ends shadowing.",
    )
    share: float = Field(1.0, gt=0, le=1, description="The share of the model's requests mirrored to it (0-1].")


def admin_router(registry: Registry, control: Control) -> APIRouter:
    """``/admin/models...``: on only when SERVE_ADMIN_KEYS is set, and only for those keys (``app.gate``).
    Each change runs whole inside ``control.exclusive()``: its checks, the change and its answer see no other."""
    router = APIRouter(prefix="/admin", tags=["admin"])

    def on_disk(entry: ModelEntry, version: str) -> str:
        if version not in entry.on_disk():
            raise HTTPException(
                404,
                f"no version '{version}' of {entry.name} on disk; there are: "
                f"{', '.join(entry.on_disk()) or 'none'} (train one with `python -m training "
                f"{entry.name}`)",
            )
        return version

    def outcome(entry: ModelEntry, versions: list[str]) -> dict:
        """The model's state here; a 422 naming the reason if a version asked for did not load (the version
        that served before still does)."""
        failed = {v: why for v in versions if (why := entry.failed_now(v)) is not None}
        if failed:
            raise HTTPException(
                422,
                "; ".join(f"version {v} did not load ({why})" for v, why in failed.items())
                + f"; {entry.default or 'nothing'} keeps serving",
            )
        return {"model": entry.name, **entry.status()}

    @router.get("/models", summary="Every model's versions in every worker process", operation_id="admin_models")
    async def models() -> dict:
        return {"workers": control.reports()}

    @router.post("/models/{name}/load", summary="Load a version, or look for new ones", operation_id="admin_load")
    async def load(name: str, body: VersionBody | None = None) -> dict:
        """Loaded, verified and warmed up beside the serving version; the newest becomes the default unless
        a version is pinned. A named version stays loaded for POST /{model}/versions/{version}."""
        entry, version = registry.entry(name), body.version if body else None
        async with control.exclusive():
            if version is not None:
                on_disk(entry, version)

                def edit(desired: Desired) -> None:
                    if version not in desired.extra:
                        desired.extra.append(version)

                await control.change(name, edit, frozenset({version}))
                return outcome(entry, [version])
            newest = entry.newest_on_disk()  # from now on the newest that every worker may serve
            found = [newest] if newest else []
            await control.change(name, lambda desired: desired.consider(newest), frozenset(found))
            return outcome(entry, found)

    @router.post("/models/{name}/unload", summary="Unload a version", operation_id="admin_unload")
    async def unload(name: str, body: VersionBody) -> dict:
        entry = registry.entry(name)
        version = body.version
        if version is None:
            raise HTTPException(422, 'send {"version": "..."}: the version to unload')
        async with control.exclusive():
            if version == entry.default or version in entry.desired.split or version == entry.desired.pin:
                raise HTTPException(
                    409,
                    f"version {version} of {name} is serving (the default, pinned or in the "
                    "split); pin another version or end the split first",
                )

            def edit(desired: Desired) -> None:
                desired.extra = [v for v in desired.extra if v != version]

            await control.change(name, edit)
            return outcome(entry, [])

    @router.put(
        "/models/{name}/default",
        summary="Pin the version that serves (or the newest again)",
        operation_id="admin_default",
    )
    async def default(name: str, body: VersionBody) -> dict:
        """Pinning the previous version is a rollback in one call: it is loaded (if it is not), warmed up, then
        switched to; the version it replaces is unloaded once its requests finish."""
        entry = registry.entry(name)
        version = body.version and on_disk(entry, body.version)
        async with control.exclusive():
            before = entry.desired.pin

            def edit(desired: Desired) -> None:
                desired.pin = version

            await control.change(name, edit, frozenset({version} if version else ()))
            if version is not None and entry.default != version:
                reason = entry.failed_now(version) or "it did not load"
                await control.change(name, lambda desired: setattr(desired, "pin", before))
                raise HTTPException(
                    422, f"version {version} did not load ({reason}); {entry.default or 'nothing'} keeps serving"
                )
            return outcome(entry, [])

    @router.put("/models/{name}/split", summary="Split traffic between versions (a canary)", operation_id="admin_split")
    async def split(name: str, body: SplitBody) -> dict:
        entry = registry.entry(name)
        weights = body.weights
        if len(weights) == 1:
            raise HTTPException(
                422,
                'send two or more versions with positive weights, e.g. {"weights": {"A": 90, '
                '"B": 10}}, or {"weights": {}} to end the split',
            )
        for version in weights:
            on_disk(entry, version)
        async with control.exclusive():
            before = dict(entry.desired.split)

            guard_before = (entry.desired.guard, entry.desired.guard_since)
            guard = body.guard.model_dump() if body.guard and weights else None

            def edit(desired: Desired) -> None:
                desired.split = dict(weights)
                desired.guard, desired.guard_since = guard, time.time() if guard else None

            def undo(desired: Desired) -> None:
                desired.split = before
                desired.guard, desired.guard_since = guard_before

            await control.change(name, edit, frozenset(weights))
            if weights and entry.split != weights:
                reasons = [f"version {v} did not load ({why})" for v in weights if (why := entry.failed_now(v))]
                await control.change(name, undo)
                raise HTTPException(
                    422,
                    "; ".join(reasons or ["the split's versions did not all load"]) + "; the traffic stays as it was",
                )
            return outcome(entry, [])

    @router.put("/models/{name}/shadow", summary="Mirror a share of requests to a version", operation_id="admin_shadow")
    async def shadow(name: str, body: ShadowBody) -> dict:
        """The version answers a copy of that share of the model's requests after the caller's answer is ready;
        callers see only the serving version's answers. How the shadow's answers compare is in this model's
        ``shadow`` on GET /admin/models and in the metrics."""
        entry = registry.entry(name)
        version = body.version and on_disk(entry, body.version)
        async with control.exclusive():
            before = entry.desired.shadow

            def edit(desired: Desired) -> None:
                desired.shadow = {"version": version, "share": body.share} if version else None

            await control.change(name, edit, frozenset({version} if version else ()))
            if version is not None and (why := entry.failed_now(version)) is not None:
                await control.change(name, lambda desired: setattr(desired, "shadow", before))
                raise HTTPException(422, f"version {version} did not load ({why}); nothing is mirrored")
            return outcome(entry, [])

    return router
