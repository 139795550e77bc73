"""Versioned model artifacts: the manifest contract between training/ and service/.

A model's folder is a repository of versions, ``artifacts/<model>/<version>/``, each a complete artifact; a
version's name is its manifest's ``version`` (training names them by UTC time, ``2026.11.25.141500``, so they
sort in the order they were made). Training writes a version into a hidden ``.partial-*`` folder and renames
it into place once its manifest (and signature) is written, so a server that polls the folder sees a version
whole or not at all. An artifact folder holds ``manifest.json`` plus the files it lists with their sha256
(and, when training was given a signing key, ``manifest.sig``: an ed25519 signature of the manifest's bytes).
Readers go through :class:`Artifact`, which refuses any file whose bytes do not match the manifest, so nothing
is deserialised before its hash is checked; with a public key it also refuses a manifest that is not signed by
the matching private key, so a re-hashed manifest is refused too.

Nothing is unpickled: weights load with ``torch.load(weights_only=True)``, preprocessors are JSON or
``skops`` files whose every type must be in :data:`TRUSTED_TYPES` (checked before anything is built).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import uuid
import zipfile
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # base64 of the raw 64-byte ed25519 signature of manifest.json's exact bytes
PICKLES = (".joblib", ".pkl", ".pickle")  # what older artifacts held; never opened

# Every type a skops file may contain, as "module.name" (skops's own notation): exactly what the committed
# preprocessors hold (the house-price Pipeline; a plain StandardScaler, like the toy model's, needs a subset).
# Listed from the written files (every node of their schema.json; skops.io.get_untrusted_types names the
# two that skops does not trust by default: numpy.dtype and engineer). A file holding any other type is
# refused before anything is built from it. A preprocessor with new kinds of steps needs its types added here.
TRUSTED_TYPES: tuple[str, ...] = (
    "builtins.dict",
    "builtins.list",
    "builtins.slice",
    "builtins.str",
    "builtins.tuple",
    "numpy.dtype",
    "numpy.float64",
    "numpy.log1p",
    "numpy.ndarray",
    "service.models.house_price.engineer",
    "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "sklearn.preprocessing._function_transformer.FunctionTransformer",
)


class ArtifactError(RuntimeError):
    """An artifact is missing, tampered with, or was written by libraries that cannot load it.

    Messages name files relative to the artifact folder: they reach clients, server paths must not."""


def refuse_link(path: Path, label: str) -> None:
    """Refuse a symbolic link: it could lead out of the artifacts folder (to /etc/passwd, to another tree), and
    what is read from it may reach clients in a reason. ``label`` names it relative to the artifacts folder."""
    if path.is_symlink():
        raise ArtifactError(f"{label} is a symbolic link; artifacts hold plain files and folders only")


def manifest_problems(exc: ValidationError) -> str:
    """A manifest's validation errors without its content: the top-level field and pydantic's message only.
    (``str(exc)`` quotes the input, and deeper locations hold the manifest's own keys.)"""
    return "; ".join(
        dict.fromkeys(
            f"{e['loc'][0]}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors(include_input=False, include_url=False)
        )
    )


class MissingArtifactError(ArtifactError):
    """The folder has no manifest: the model was never trained (or SERVE_ARTIFACTS_DIR points elsewhere)."""


VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a folder name, a URL segment, a metric label
PARTIAL_PREFIX = ".partial-"  # a version being written


def version_key(version: str) -> tuple:
    """Sort key for version names: dot-separated numbers compare as numbers (2 < 10, 2026.11.9 < 2026.11.10)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in version.split("."))


def version_folders(model_dir: Path) -> dict[str, Path]:
    """Every version in a model's folder, oldest first: the subfolders holding a manifest (partial writes and
    other hidden folders are skipped). Symbolic links are listed, so that :class:`Artifact` refuses them
    with the reason, rather than the version silently missing."""
    if not model_dir.is_dir():
        return {}
    found = [
        p
        for p in model_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and VERSION_NAME.fullmatch(p.name) and (p / MANIFEST).is_file()
    ]
    return {p.name: p for p in sorted(found, key=lambda p: version_key(p.name))}


def staging_folder(model_dir: Path) -> Path:
    """A fresh hidden folder to write a new version into (see :func:`publish_version`)."""
    folder = model_dir / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    return folder


def publish_version(staging: Path) -> Path:
    """Move a finished version (manifest written, signed if it is to be) to ``<model>/<its version>/`` in one
    rename, so a polling server never sees it half-written."""
    version = Manifest.model_validate_json((staging / MANIFEST).read_bytes()).version
    target = staging.parent / version
    if target.exists():
        raise FileExistsError(f"{target} already exists: a version is never overwritten")
    os.rename(staging, target)
    return target


class QualityGate(BaseModel):
    """Training's verdict on a version before it was published: its repeated-CV score against plain baselines
    fitted on the same folds, the version served before it, and a floor kept per model."""

    metric: str = Field(description="The score compared, e.g. cv_accuracy_mean or cv_rmse_log_mean.")
    higher_is_better: bool
    score: float
    baselines: dict[str, float] = Field(description="Each baseline's score on the same folds (or split).")
    floor: float = Field(description="The worst score a version of this model may have and still serve.")
    committed: dict[str, Any] | None = Field(
        None, description="The newest servable version before this one: {version, score}, where there was one."
    )
    passed: bool
    reasons: list[str] = Field([], description="Why it did not pass (empty when it did).")
    forced: bool = Field(False, description="Published anyway with --force: never made the default on its own.")


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
    gate: QualityGate | None = Field(None, description="The quality gate's verdict (absent: trained before gates).")

    @property
    def refusal(self) -> str | None:
        """Why the server must not make this version its default on its own (an admin may still pin it)."""
        if self.quick:
            return "a --quick smoke-test version (trained on a data slice)"
        if self.gate is not None and not self.gate.passed:
            return "a version that failed training's quality gate (" + "; ".join(self.gate.reasons) + ")"
        return None


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

    Fitted scikit-learn objects are only guaranteed to work in the same minor release; torch state
    dicts load in the same major release at the same or a newer minor one.
    """
    have = library_versions()
    wanted = libraries.get("scikit-learn")
    if wanted and _major_minor(wanted) != _major_minor(have["scikit-learn"]):
        raise ArtifactError(
            f"written with scikit-learn {wanted}, but {have['scikit-learn']} is installed; "
            "install the same minor version or retrain"
        )
    wanted = libraries.get("torch")
    if wanted:
        need, got = _major_minor(wanted), _major_minor(have["torch"])
        if need[:1] != got[:1] or got < need:
            raise ArtifactError(
                f"written with torch {wanted}, but {have['torch']} is installed; "
                "install a torch of the same major version, at least as new, or retrain"
            )


def skops_types(data: bytes) -> set[str]:
    """Every type named in a skops file ("module.name"), read from its schema without building anything."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        schema = json.loads(archive.read("schema.json"))
    types, stack = set(), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node:
                types.add(f"{node.get('__module__')}.{node.get('__class__')}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return types


def public_key(value: str | Ed25519PublicKey) -> Ed25519PublicKey:
    """An ed25519 public key from PEM text or the path of a PEM file (SERVE_MANIFEST_PUBLIC_KEY)."""
    if isinstance(value, Ed25519PublicKey):
        return value
    text = value.strip()
    try:
        pem = text.encode() if text.startswith("-----BEGIN") else Path(text).expanduser().read_bytes()
        key = serialization.load_pem_public_key(pem)
    except (OSError, ValueError, TypeError) as exc:
        # The message may reach clients (/readyz): it names the setting, never the path.
        raise ArtifactError(
            "SERVE_MANIFEST_PUBLIC_KEY is neither a PEM public key nor the path of a readable "
            f"file holding one ({type(exc).__name__})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(f"SERVE_MANIFEST_PUBLIC_KEY must be an ed25519 key, not {type(key).__name__}")
    return key


def private_key(path: Path) -> Ed25519PrivateKey:
    """The ed25519 private key that training signs manifests with (an unencrypted PEM file)."""
    key = serialization.load_pem_private_key(Path(path).expanduser().read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
    return key


def sign_manifest(folder: Path, key: Ed25519PrivateKey) -> Path:
    """Write ``manifest.sig`` beside ``manifest.json``: the signature of its exact bytes, base64."""
    signature = key.sign((folder / MANIFEST).read_bytes())
    (folder / SIGNATURE).write_text(base64.b64encode(signature).decode() + "\n")
    return folder / SIGNATURE


class Artifact:
    """A verified artifact folder: every read checks the file's bytes against the manifest.

    With ``public_key`` (PEM text, a PEM file's path, or a key), the manifest must also carry a valid
    ``manifest.sig`` made by the matching private key; without one, the hashes alone guard against
    corruption (not against someone who can rewrite the manifest too)."""

    def __init__(self, folder: Path, public_key: str | Ed25519PublicKey | None = None):
        self.folder = folder
        self.label = f"{folder.parent.name}/{folder.name}"  # "<model>/<version>": what messages name, never a path
        # Nothing may lead out of the artifacts folder: not the model's folder, the version's, or the manifest.
        refuse_link(folder.parent, folder.parent.name)
        refuse_link(folder, self.label)
        path = folder / MANIFEST
        refuse_link(path, f"{self.label}/{MANIFEST}")
        if not path.is_file():
            raise MissingArtifactError(f"no {MANIFEST} in the artifacts folder '{folder.name}'")
        raw = path.read_bytes()  # read once: the bytes verified are the bytes parsed
        if public_key is not None:
            self._verify_signature(raw, public_key)
        try:
            self.manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:  # the reason reaches clients: never the manifest's content
            raise ArtifactError(f"{self.label}/{MANIFEST} is not a valid manifest: {manifest_problems(exc)}") from None
        check_compatible(self.manifest.libraries)
        for name in self.manifest.files:
            self.read(name)  # verify every file up front, so a broken artifact never half-loads

    def _verify_signature(self, manifest: bytes, key: str | Ed25519PublicKey) -> None:
        verifier = public_key(key)
        path = self.folder / SIGNATURE
        refuse_link(path, f"{self.label}/{SIGNATURE}")
        if not path.is_file():
            raise ArtifactError(
                f"{self.label}/{MANIFEST} is not signed (no {SIGNATURE}), and a manifest "
                "public key is configured: sign it when training (--sign-key) or unset "
                "SERVE_MANIFEST_PUBLIC_KEY"
            )
        try:
            verifier.verify(base64.b64decode(path.read_bytes().strip(), validate=True), manifest)
        except (InvalidSignature, binascii.Error, ValueError):
            raise ArtifactError(
                f"{self.label}/{SIGNATURE} is not a valid signature of {MANIFEST} by the "
                "configured public key: the manifest was changed after signing, or signed with "
                "another key; refusing to load it"
            ) from None

    def read(self, name: str) -> bytes:
        expected = self.manifest.files.get(name)
        if expected is None:
            pickles = sorted(n for n in self.manifest.files if n.endswith(PICKLES))
            hint = (
                (
                    f"; it lists {', '.join(pickles)}: pickles can run code, so the service never opens them. "
                    f"Retrain with `python -m training {self.manifest.name}`"
                )
                if pickles
                else ""
            )
            raise ArtifactError(f"{name} is not listed in {self.label}/{MANIFEST}{hint}")
        # A manifest names plain files in its own folder: no paths, no "..", no links leading out of it.
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(
                f"{self.label}/{MANIFEST} lists {name!r}, which is not a plain file name "
                "in the artifact's folder; refusing to read it"
            )
        path = self.folder / name
        refuse_link(path, f"{self.label}/{name}")
        if not path.is_file():
            raise ArtifactError(f"{self.label}/{name} is missing")
        data = path.read_bytes()
        if sha256_bytes(data) != expected:
            raise ArtifactError(f"sha256 of {self.label}/{name} does not match the manifest; refusing to load it")
        return data

    def load_state_dict(self, name: str = "model.pt", device: str | torch.device = "cpu") -> dict:
        return torch.load(io.BytesIO(self.read(name)), map_location=device, weights_only=True)

    def load_skops(self, name: str = "preprocessor.skops", trusted: tuple[str, ...] = TRUSTED_TYPES) -> Any:
        """A fitted scikit-learn object from a skops file whose every type is in ``trusted`` (no pickle):
        the types are listed from the file's schema and checked before skops builds anything."""
        data = self.read(name)
        try:
            untrusted = sorted(skops_types(data) - set(trusted))
        except (zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise ArtifactError(f"{self.label}/{name} is not a skops file: {exc}") from None
        if untrusted:
            raise ArtifactError(
                f"{self.label}/{name} holds types outside the trusted list: {', '.join(untrusted)}; refusing to load it"
            )
        import skops.io  # here, not at the top: the training command never loads a preprocessor

        try:  # skops audits the tree again against its own defaults plus ours before building it
            return skops.io.loads(data, trusted=list(trusted))
        except Exception as exc:
            raise ArtifactError(f"{self.label}/{name} did not load: {type(exc).__name__}: {exc}") from None

    def load_json(self, name: str) -> Any:
        return json.loads(self.read(name))


def new_version() -> str:
    """A version name from the UTC time, to the second (names sort in time order)."""
    return datetime.now(UTC).strftime("%Y.%m.%d.%H%M%S")


def write_artifact(
    folder: Path,
    *,
    name: str,
    hyperparameters: dict,
    metrics: dict,
    metrics_method: str,
    data_files: list[Path],
    extra: dict | None = None,
    quick: bool = False,
    version: str | None = None,
    gate: QualityGate | None = None,
) -> Manifest:
    """Hash every file already written to ``folder`` and write its manifest last (sign it afterwards)."""
    files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    }
    now = datetime.now(UTC)
    commit, tree = source_revision()
    manifest = Manifest(
        name=name,
        version=version or new_version(),
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
        gate=gate,
    )
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest
