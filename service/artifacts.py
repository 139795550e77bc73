"""Versioned model artifacts: the manifest contract between training/ and service/.

An artifact folder holds ``manifest.json`` plus the files it lists with their sha256. Readers go through
:class:`Artifact`, which refuses any file whose bytes do not match the manifest, so nothing is unpickled
or deserialised before its hash is checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import joblib
import torch
from pydantic import BaseModel, Field

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, tampered with, or was written by libraries that cannot load it.

    Messages name files relative to the artifact folder: they reach clients, server paths must not."""


class MissingArtifactError(ArtifactError):
    """The folder has no manifest: the model was never trained (or SERVE_ARTIFACTS_DIR points elsewhere)."""


class Manifest(BaseModel):
    name: str
    version: str
    created_at: str
    git_commit: str | None = Field(description="The training code's commit; null outside a git checkout.")
    git_tree: str = Field("unknown", description="'clean', 'dirty' (uncommitted changes to the code) or why unknown.")
    quick: bool = Field(False, description="Trained with --quick on a data slice: a smoke test, not for serving.")
    libraries: dict[str, str]
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    metrics_method: str = Field(description="How the metrics were measured (split, folds, rows).")
    data: dict[str, str] = Field(description="sha256 of each training data file.")
    files: dict[str, str] = Field(description="sha256 of each artifact file.")
    extra: dict[str, Any] = {}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__.split("+")[0],
        "scikit-learn": version("scikit-learn"),  # read from the installed metadata: no need to import them
        "numpy": version("numpy"),
    }


def source_revision() -> tuple[str | None, str]:
    """(commit, tree state) of the code doing the training: (HEAD, "clean" or "dirty"), or (None, why not)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"git {args[0]} failed")
        return out.stdout.strip()
    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)service", ":(top)training")
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, f"unknown: {exc}"
    return commit, "dirty" if dirty else "clean"


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def check_compatible(libraries: dict[str, str]) -> None:
    """Refuse artifacts that the installed libraries cannot be trusted to load.

    Pickled scikit-learn objects are only guaranteed to load in the same minor release; torch state
    dicts load in the same major release at the same or a newer minor one.
    """
    have = library_versions()
    wanted = libraries.get("scikit-learn")
    if wanted and _major_minor(wanted) != _major_minor(have["scikit-learn"]):
        raise ArtifactError(f"written with scikit-learn {wanted}, but {have['scikit-learn']} is installed; "
                            "install the same minor version or retrain")
    wanted = libraries.get("torch")
    if wanted:
        need, got = _major_minor(wanted), _major_minor(have["torch"])
        if need[:1] != got[:1] or got < need:
            raise ArtifactError(f"written with torch {wanted}, but {have['torch']} is installed; "
                                "install a torch of the same major version, at least as new, or retrain")


class Artifact:
    """A verified artifact folder: every read checks the file's bytes against the manifest."""

    def __init__(self, folder: Path):
        self.folder = folder
        path = folder / MANIFEST
        if not path.is_file():
            raise MissingArtifactError(f"no {MANIFEST} in the artifacts folder '{folder.name}'")
        try:
            self.manifest = Manifest.model_validate_json(path.read_bytes())
        except ValueError as exc:
            raise ArtifactError(f"{folder.name}/{MANIFEST} is not a valid manifest: {exc}") from exc
        check_compatible(self.manifest.libraries)
        for name in self.manifest.files:
            self.read(name)  # verify every file up front, so a broken artifact never half-loads

    def read(self, name: str) -> bytes:
        expected = self.manifest.files.get(name)
        if expected is None:
            raise ArtifactError(f"{name} is not listed in {self.folder.name}/{MANIFEST}")
        # A manifest names plain files in its own folder: no paths, no "..", no links leading out of it.
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{self.folder.name}/{MANIFEST} lists {name!r}, which is not a plain file name "
                                "in the artifact's folder; refusing to read it")
        path = self.folder / name
        if path.is_symlink():
            raise ArtifactError(f"{self.folder.name}/{name} is a symbolic link; artifacts hold plain files only")
        if not path.is_file():
            raise ArtifactError(f"{self.folder.name}/{name} is missing")
        data = path.read_bytes()
        if sha256_bytes(data) != expected:
            raise ArtifactError(f"sha256 of {self.folder.name}/{name} does not match the manifest; refusing to load it")
        return data

    def load_state_dict(self, name: str = "model.pt", device: str | torch.device = "cpu") -> dict:
        return torch.load(io.BytesIO(self.read(name)), map_location=device, weights_only=True)

    def load_joblib(self, name: str = "preprocessor.joblib") -> Any:
        return joblib.load(io.BytesIO(self.read(name)))

    def load_json(self, name: str) -> Any:
        return json.loads(self.read(name))


def write_artifact(folder: Path, *, name: str, hyperparameters: dict, metrics: dict, metrics_method: str,
                   data_files: list[Path], extra: dict | None = None, quick: bool = False) -> Manifest:
    """Hash every file already written to ``folder`` and write its manifest last."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    now = datetime.now(timezone.utc)
    commit, tree = source_revision()
    manifest = Manifest(
        name=name,
        version=now.strftime("%Y.%m.%d.%H%M%S"),
        created_at=now.isoformat(timespec="seconds"),
        git_commit=commit,
        git_tree=tree,
        quick=quick,
        libraries=library_versions(),
        hyperparameters=hyperparameters,
        metrics=metrics,
        metrics_method=metrics_method,
        data={p.name: sha256_file(p) for p in data_files},
        files=files,
        extra=extra or {},
    )
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest
