"""Artifacts that cannot run code: nothing is unpickled at load, skops files may hold only the trusted types,
and with a public key configured a manifest must carry a valid ed25519 signature (so a re-hashed one is
refused). Every attack here writes a marker file if its code ever runs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path

import pytest
import skops.io
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service import catalog
from service.app import create_app
from service.artifacts import (
    MANIFEST,
    SIGNATURE,
    TRUSTED_TYPES,
    Artifact,
    ArtifactError,
    sign_manifest,
    skops_types,
    write_artifact,
)
from service.runtime.registry import ModelUnavailableError, open_model
from service.settings import Settings
from tests.conftest import ARTIFACTS, example, serving, version_dir

PHONE, HOUSE = catalog.get("phone-price"), catalog.get("house-price")


def rehash(folder: Path, version: str | None = None) -> None:
    """What an attacker who can write the folder does after changing a file: a manifest with the new hashes
    (under ``version`` where the folder was copied to a new version's name)."""
    old = json.loads((folder / MANIFEST).read_text())
    write_artifact(
        folder,
        name=old["name"],
        hyperparameters=old["hyperparameters"],
        metrics=old["metrics"],
        metrics_method=old["metrics_method"],
        data_files=[],
        extra=old["extra"],
        version=version or old["version"],
    )


class Boom:
    """Loading an instance writes its marker: the custom-class attack on a skops file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("code ran at load")


class Pickled:
    """Unpickling an instance runs a shell command: the issue's ``__reduce__`` -> ``os.system`` attack."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def os_system_skops(command: str) -> bytes:
    """A hand-made skops file whose loading calls ``os.system(command)`` (a constructor-from-reduce node)."""
    args = json.loads(zipfile.ZipFile(io.BytesIO(skops.io.dumps((command,)))).read("schema.json"))
    schema = {
        "__class__": os.system.__name__,
        "__module__": os.system.__module__,
        "__loader__": "ConstructorFromReduceNode",
        "content": args,
        "__id__": 1,
        "protocol": args["protocol"],
        "_skops_version": args["_skops_version"],
    }
    for key in ("protocol", "_skops_version"):
        args.pop(key)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema))
    return buffer.getvalue()


def test_the_trusted_types_are_exactly_what_the_committed_preprocessor_holds():
    """The list in service/artifacts.py is not a blanket allowance: the house pipeline uses every entry."""
    assert skops_types((version_dir(ARTIFACTS / HOUSE.folder) / "preprocessor.skops").read_bytes()) == set(
        TRUSTED_TYPES
    )
    committed = [p.name for p in ARTIFACTS.rglob("*") if p.suffix in (".joblib", ".pkl", ".pickle")]
    assert committed == [], "no pickles among the committed artifacts"


@pytest.mark.parametrize("attack", ["custom class", "os.system"])
def test_a_skops_file_with_an_untrusted_type_never_runs_its_code(artifacts_copy, tmp_path, attack):
    if attack == "custom class":
        make, bad_type = (lambda path: skops.io.dumps(Boom(path))), f"{Boom.__module__}.Boom"
    else:
        make, bad_type = (lambda path: os_system_skops(f"touch {shlex.quote(str(path))}")), "posix.system"
        if os.system.__module__ != "posix":
            pytest.skip("the os.system payload is written for POSIX")
    skops.io.loads(make(tmp_path / "live"), trusted=[bad_type])  # the payload is live: trusted, it runs
    assert (tmp_path / "live").exists()
    marker = tmp_path / "pwned"
    payload = make(marker)
    folder = version_dir(artifacts_copy / HOUSE.folder)
    (folder / "preprocessor.skops").write_bytes(payload)
    rehash(folder)

    artifact = Artifact(folder)  # the hashes match: this is tampering, not corruption
    with pytest.raises(ArtifactError, match=f"types outside the trusted list: {bad_type}; refusing"):
        artifact.load_skops("preprocessor.skops")
    with pytest.raises(ModelUnavailableError, match=f"ArtifactError: .*{bad_type}"):
        open_model(HOUSE, artifacts_copy)
    assert not marker.exists()


def test_a_leftover_pickle_is_never_opened(artifacts_copy, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Pickled(tmp_path / "live")))  # the payload is live
    assert (tmp_path / "live").exists()
    for model in (PHONE, HOUSE):
        folder = version_dir(artifacts_copy / model.folder)
        (folder / "preprocessor.joblib").write_bytes(pickle.dumps(Pickled(marker)))
        rehash(folder)  # the pickle is now listed and hashed, beside the real preprocessor

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled at load")

    import joblib

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (joblib, "load")]:
        monkeypatch.setattr(module, name, refuse)
    for model in (PHONE, HOUSE):
        entry = open_model(model, artifacts_copy)  # weights, JSON and skops files only
        (answer,) = entry.predictor.run([entry.Input.model_validate(example(model.name))])
        assert isinstance(answer, entry.predictor.Output)
    assert not marker.exists()

    # An artifact from before skops, whose only preprocessor is the pickle, is refused with what to do.
    folder = version_dir(artifacts_copy / HOUSE.folder)
    (folder / "preprocessor.skops").unlink()
    rehash(folder)
    with pytest.raises(ModelUnavailableError, match=r"pickles can run code.*python -m training house-price"):
        open_model(HOUSE, artifacts_copy)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change", [{"kind": "MinMaxScaler"}, {"scale": [0.0] * 20}, {"mean": [1.0]}, {"features": ["ram"] * 20}]
)
def test_phone_refuses_a_preprocessor_it_cannot_apply(artifacts_copy, change):
    """The phone model applies a StandardScaler's formula itself, over the API's 20 features in order."""
    folder = version_dir(artifacts_copy / PHONE.folder)
    scaler = json.loads((folder / "preprocessor.json").read_text())
    (folder / "preprocessor.json").write_text(json.dumps({**scaler, **change}))
    rehash(folder)
    with pytest.raises(
        ModelUnavailableError,
        match=r"ArtifactError: phone_price/[0-9.]+/preprocessor.json must be a "
        "StandardScaler",
    ):
        open_model(PHONE, artifacts_copy)


@pytest.fixture
def keys(tmp_path):
    """An ed25519 key pair: the private key object, and the public key as PEM text and as a file."""
    private = Ed25519PrivateKey.generate()
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (tmp_path / "public.pem").write_text(pem)
    return private, pem, tmp_path / "public.pem"


def test_signed_manifests(artifacts_copy, keys, monkeypatch):
    private, pem, pem_file = keys
    folder = version_dir(artifacts_copy / PHONE.folder)
    with pytest.raises(ArtifactError, match=f"not signed \\(no {SIGNATURE}\\)"):
        Artifact(folder, pem)
    sign_manifest(folder, private)
    assert Artifact(folder, pem).manifest.name == PHONE.name
    assert Artifact(folder, str(pem_file)).manifest.name == PHONE.name
    monkeypatch.setenv("SERVE_MANIFEST_PUBLIC_KEY", str(pem_file))  # the setting reaches open_model too
    entry = open_model(PHONE, artifacts_copy)
    (answer,) = entry.predictor.run([entry.Input.model_validate(example(PHONE.name))])
    assert answer.price_range in range(4)

    # Tampered: a file changed and the manifest re-hashed, as before, but the signature no longer matches.
    (folder / "preprocessor.json").write_text((folder / "preprocessor.json").read_text().replace("[", "[1.0, ", 1))
    rehash(folder)
    assert Artifact(folder).manifest  # without a key: as before, the hashes alone are checked
    with pytest.raises(ArtifactError, match="not a valid signature of manifest.json"):
        Artifact(folder, pem)
    with pytest.raises(ModelUnavailableError, match="not a valid signature"):
        open_model(PHONE, artifacts_copy)

    # Signed, but with another key; a signature that is not even base64; a missing one.
    sign_manifest(folder, Ed25519PrivateKey.generate())
    with pytest.raises(ArtifactError, match="not a valid signature"):
        Artifact(folder, pem)
    (folder / SIGNATURE).write_text("not base64!\n")
    with pytest.raises(ArtifactError, match="not a valid signature"):
        Artifact(folder, pem)
    (folder / SIGNATURE).unlink()
    with pytest.raises(ArtifactError, match="not signed"):
        Artifact(folder, pem)


def test_a_bad_public_key_setting_is_refused_without_naming_the_path(artifacts_copy, tmp_path):
    folder = version_dir(artifacts_copy / PHONE.folder)
    for value in [str(tmp_path / "secret-dir" / "missing.pem"), "-----BEGIN PUBLIC KEY-----\nnope\n"]:
        with pytest.raises(ArtifactError, match="SERVE_MANIFEST_PUBLIC_KEY is neither") as info:
            Artifact(folder, value)
        assert "secret-dir" not in str(info.value)
    from cryptography.hazmat.primitives.asymmetric import ec

    other = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ArtifactError, match="must be an ed25519 key"):
        Artifact(folder, other)


def test_with_signing_on_an_unsigned_model_fails_and_the_signed_one_serves(artifacts_copy, keys):
    private, _, pem_file = keys
    sign_manifest(version_dir(artifacts_copy / PHONE.folder), private)
    house = version_dir(artifacts_copy / HOUSE.folder)
    sign_manifest(house, private)
    (house / "features.json").write_text((house / "features.json").read_text().replace('"', ' "', 1))
    rehash(house)  # tampered with, re-hashed: the signature no longer matches

    async def scenario():
        settings = Settings(artifacts_dir=artifacts_copy, manifest_public_key=str(pem_file))
        async with serving(create_app(settings, models=[PHONE, HOUSE])) as client:
            ready = (await client.get("/readyz")).json()["models"]
            assert ready["phone-price"] == "ready" and "not a valid signature" in ready["house-price"]
            assert (await client.get("/models/house-price")).json()["state"] == "failed"
            assert (await client.post("/phone-price", json=example(PHONE.name))).status_code == 200
            assert (await client.post("/house-price", json={"GrLivArea": 1710})).status_code == 503

    asyncio.run(scenario())


def test_the_signature_is_not_listed_in_the_manifest_and_training_refuses_a_bad_key(artifacts_copy, keys, tmp_path):
    private, pem, _ = keys
    folder = version_dir(artifacts_copy / PHONE.folder)
    sign_manifest(folder, private)
    rehash(folder)  # a new manifest in a folder that holds a signature: the signature is not one of its files
    assert SIGNATURE not in json.loads((folder / MANIFEST).read_text())["files"]

    from training.__main__ import main

    (tmp_path / "not-a-key.pem").write_text(pem)  # a public key where the private one should be
    with pytest.raises(SystemExit) as exit_info:
        main(["phone-price", "--sign-key", str(tmp_path / "not-a-key.pem"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()  # refused before any training


SECRET = "TOP-SECRET-MARKER-7f3a"  # what a file outside the artifacts holds; no client may ever see it


def bodies(artifacts_dir: Path) -> list[str]:
    """What anonymous callers see with phone-price broken and house-price serving: /readyz, /models, a 503."""

    async def scenario():
        async with serving(create_app(Settings(artifacts_dir=artifacts_dir), models=[PHONE, HOUSE])) as client:
            ready = (await client.get("/readyz")).json()["models"]
            assert ready["house-price"] == "ready" and ready["phone-price"] != "ready"
            assert (await client.post("/house-price", json={"GrLivArea": 1710})).status_code == 200
            refused = await client.post("/phone-price", json=example(PHONE.name))
            assert refused.status_code == 503
            return [
                (await client.get("/readyz")).text,
                (await client.get("/models")).text,
                (await client.get("/models/phone-price")).text,
                refused.text,
            ]

    return asyncio.run(scenario())


@pytest.mark.parametrize("manifest", ["symlink", "not json", "wrong types"])
def test_a_bad_manifest_never_shows_its_content_to_clients(artifacts_copy, tmp_path, manifest):
    """A manifest.json linked to a file outside the artifacts is never read; a plain bad one is refused
    naming the fields at fault, never their values (pydantic's own message quotes the input)."""
    folder = version_dir(artifacts_copy / PHONE.folder)
    label = f"{PHONE.folder}/{folder.name}/{MANIFEST}"
    if manifest == "symlink":
        (tmp_path / "secret.txt").write_text(f"{SECRET}: the rest of a private file\n")
        (folder / MANIFEST).unlink()
        (folder / MANIFEST).symlink_to(tmp_path / "secret.txt")
        why = f"{label} is a symbolic link"
    elif manifest == "not json":
        (folder / MANIFEST).write_text(f"{SECRET} is not JSON")
        why = f"{folder.name}/{MANIFEST} is not a valid manifest: Invalid JSON"
    else:  # the secret as a wrong-typed value and as a key inside a field
        good = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**good, "name": [SECRET], "files": {SECRET: 1}}))
        why = f"{folder.name}/{MANIFEST} is not a valid manifest: name: Input should be a valid string; files:"

    with pytest.raises(ArtifactError) as info:
        Artifact(folder)
    assert why in str(info.value) and SECRET not in str(info.value)
    for body in bodies(artifacts_copy):
        assert SECRET not in body and str(tmp_path) not in body
    assert why in bodies(artifacts_copy)[0]


def test_a_symlinked_signature_is_refused(artifacts_copy, keys, tmp_path):
    private, pem, _ = keys
    folder = version_dir(artifacts_copy / PHONE.folder)
    sign_manifest(folder, private)  # a valid signature, but kept outside the artifacts
    (folder / SIGNATURE).rename(tmp_path / SIGNATURE)
    (folder / SIGNATURE).symlink_to(tmp_path / SIGNATURE)
    with pytest.raises(ArtifactError, match=f"{PHONE.folder}/{folder.name}/{SIGNATURE} is a symbolic link") as info:
        Artifact(folder, pem)
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("linked", ["version", "model"])
def test_a_folder_linked_out_of_the_artifacts_is_refused(artifacts_copy, tmp_path, linked):
    """A version folder (or a model's folder) that is a symbolic link is a failed version with the reason,
    even when what it points at is a sound artifact; the other models keep serving."""
    version = version_dir(artifacts_copy / PHONE.folder)
    link = version if linked == "version" else artifacts_copy / PHONE.folder
    outside = tmp_path / "outside" / link.name
    outside.parent.mkdir()
    link.rename(outside)
    link.symlink_to(outside, target_is_directory=True)
    why = f"{link.relative_to(artifacts_copy)} is a symbolic link"

    with pytest.raises(ModelUnavailableError, match=f"version {version.name}: ArtifactError: {why}") as info:
        open_model(PHONE, artifacts_copy)
    assert str(tmp_path) not in str(info.value)
    texts = bodies(artifacts_copy)
    assert why in texts[0] and all(str(tmp_path) not in text for text in texts)
