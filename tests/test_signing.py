"""Signed packages (issue 12): ``packager sign`` / ``--public-key`` / ``PACKAGER_PUBLIC_KEY``, with real
elliptic-curve keys, a real exported package and the OpenSSF model-signing library (no mocks)."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("model_signing")
pytest.importorskip("onnxruntime")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

import runtimes  # noqa: E402
from packager.errors import (ExistsError, ExitCode, InputError, IntegrityError,  # noqa: E402
                             SignatureVerificationError)
from packager.package import Package  # noqa: E402
from packager.packing import pack, sign, unpack  # noqa: E402
from packager.signing import PUBLIC_KEY_ENV, SIGNATURE_NAME, package_files, verify_signature  # noqa: E402
from tests.conftest import run_cli  # noqa: E402


@pytest.fixture(autouse=True)
def _no_required_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {"alice": _keypair(folder, "alice"), "mallory": _keypair(folder, "mallory")}


@pytest.fixture(scope="module")
def unsigned_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import packager
    from sample_models.torch_models import train_mlp

    model, example = train_mlp(steps=2)
    out = tmp_path_factory.mktemp("pkg") / "mlp"
    return packager.export(model, example, out=out, formats=["onnx"], isolate=False).path


@pytest.fixture(scope="module")
def signed_pkg(unsigned_pkg: Path, keys: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg = shutil.copytree(unsigned_pkg, tmp_path_factory.mktemp("signed") / "mlp")
    sign(pkg, keys["alice"][0])
    return pkg


@pytest.fixture
def pkg(signed_pkg: Path, tmp_path: Path) -> Path:
    """A private copy of the signed package, to tamper with."""
    return shutil.copytree(signed_pkg, tmp_path / "mlp")


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


# --- round trips --------------------------------------------------------------------------------


def test_sign_and_verify_through_the_cli(unsigned_pkg: Path, keys: dict, tmp_path: Path) -> None:
    pkg = shutil.copytree(unsigned_pkg, tmp_path / "mlp")
    private, public = keys["alice"]
    proc = run_cli("sign", str(pkg), "--key", str(private))
    assert proc.returncode == 0, proc.stderr
    assert (pkg / SIGNATURE_NAME).is_file() and "signed" in proc.stdout
    assert not [p for p in os.listdir(pkg) if p.startswith(".")]  # no temporary file left behind

    proc = run_cli("verify", str(pkg), "--public-key", str(public), "--integrity-only")
    assert proc.returncode == 0, proc.stderr
    assert "signature OK" in proc.stdout and "integrity OK" in proc.stdout

    proc = run_cli("verify", str(pkg), "--public-key", str(public), "--no-sweep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "signature OK" in proc.stdout

    # An existing signature is kept unless --overwrite.
    before = (pkg / SIGNATURE_NAME).read_bytes()
    proc = run_cli("sign", str(pkg), "--key", str(private))
    assert proc.returncode == int(ExitCode.USAGE) and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    _no_traceback(proc)
    assert (pkg / SIGNATURE_NAME).read_bytes() == before
    proc = run_cli("sign", str(pkg), "--key", str(private), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    verify_signature(pkg, public)


def test_sign_and_verify_through_the_python_api(unsigned_pkg: Path, keys: dict, tmp_path: Path) -> None:
    pkg = shutil.copytree(unsigned_pkg, tmp_path / "mlp")
    private, public = keys["alice"]
    sig = sign(pkg, private)
    assert sig == pkg / SIGNATURE_NAME and sig.stat().st_size > 0
    verify_signature(pkg, public)
    verify_signature(str(pkg), str(public))
    # The signature sits at the top level: the integrity check allows it and leaves it in place.
    opened = Package(pkg, public_key=public)
    assert opened.public_key == public
    assert opened.verify_integrity().files == len(opened.manifest.all_files())
    assert sig.is_file()
    with pytest.raises(ExistsError, match="already exists"):
        sign(pkg, private)
    sign(pkg, private, overwrite=True)
    verify_signature(pkg, public)
    # What the signature covers: every file of the package, manifest and golden data included.
    covered = package_files(pkg)
    assert {"manifest.json", "onnx/model.onnx", "golden/inputs.npz", "golden/outputs.npz", SIGNATURE_NAME} <= set(covered)


def test_signature_error_is_an_integrity_error_with_exit_2() -> None:
    assert issubclass(SignatureVerificationError, IntegrityError)
    assert SignatureVerificationError("x", "y").exit_code == ExitCode.USAGE == 2


# --- tampering ----------------------------------------------------------------------------------


def test_one_flipped_byte_in_any_file_fails_naming_the_file(signed_pkg: Path, keys: dict, tmp_path: Path) -> None:
    public = keys["alice"][1]
    files = [f for f in package_files(signed_pkg) if f != SIGNATURE_NAME]
    assert {"manifest.json", "onnx/model.onnx", "golden/inputs.npz", "golden/outputs.npz"} <= set(files)
    for rel in files:
        pkg = shutil.copytree(signed_pkg, tmp_path / rel.replace("/", "_"))
        _flip(pkg / rel)
        with pytest.raises(SignatureVerificationError) as info:
            verify_signature(pkg, public)
        assert f"package file {rel!r}" in info.value.message and "changed" in info.value.message, info.value.message


def test_a_rewritten_manifest_with_matching_checksums_is_caught(pkg: Path, keys: dict) -> None:
    """What checksums cannot catch: an attacker who edits a file and rewrites manifest.json to match."""
    from tests._integrity import rehash

    _flip(pkg / "onnx/model.onnx", at=-1)
    rehash(pkg)
    Package(pkg)  # the checksums agree now
    with pytest.raises(SignatureVerificationError, match="onnx/model.onnx"):
        Package(pkg, public_key=keys["alice"][1])


def test_cli_names_the_changed_file_with_exit_2_and_no_traceback(pkg: Path, keys: dict, tmp_path: Path) -> None:
    _flip(pkg / "golden/outputs.npz")
    public = str(keys["alice"][1])
    for args in (("verify", str(pkg), "--public-key", public),
                 ("verify", str(pkg), "--public-key", public, "--integrity-only"),
                 ("run", str(pkg), "-i", str(pkg / "golden/inputs.npz"), "-o", str(tmp_path / "y.npz"), "-q",
                  "--public-key", public)):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "'golden/outputs.npz'" in proc.stderr and "signed" in proc.stderr, proc.stderr
        assert proc.stderr.count("error") == 1
        _no_traceback(proc)
    assert not (tmp_path / "y.npz").exists()


def test_resigned_with_another_key_fails_with_the_first_public_key(pkg: Path, keys: dict) -> None:
    sign(pkg, keys["mallory"][0], overwrite=True)
    verify_signature(pkg, keys["mallory"][1])
    with pytest.raises(SignatureVerificationError, match="another key"):
        verify_signature(pkg, keys["alice"][1])
    proc = run_cli("verify", str(pkg), "--public-key", str(keys["alice"][1]), "--integrity-only")
    assert proc.returncode == 2 and "another key" in proc.stderr
    _no_traceback(proc)


def test_a_damaged_signature_fails(pkg: Path, keys: dict) -> None:
    sig = pkg / SIGNATURE_NAME
    original = sig.read_bytes()
    for at in (0, len(original) // 2, len(original) - 3):
        _flip(sig, at)
        with pytest.raises(SignatureVerificationError):
            verify_signature(pkg, keys["alice"][1])
        sig.write_bytes(original)
    verify_signature(pkg, keys["alice"][1])


def test_removed_signature_fails_when_a_key_is_required_and_passes_when_not(pkg: Path, keys: dict,
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    public = keys["alice"][1]
    (pkg / SIGNATURE_NAME).unlink()
    with pytest.raises(SignatureVerificationError, match="has no signature"):
        verify_signature(pkg, public)
    with pytest.raises(SignatureVerificationError, match="has no signature"):
        runtimes.load(pkg, public_key=public)
    # No key: an unsigned package loads as before.
    Package(pkg)
    runtimes.load(pkg).close()
    proc = run_cli("run", str(pkg), "-i", str(pkg / "golden/inputs.npz"), "-o", str(tmp_path / "a.npz"), "-q")
    assert proc.returncode == 0, proc.stderr
    # Required by the environment: every load, every command.
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    with pytest.raises(SignatureVerificationError, match="has no signature"):
        Package(pkg)
    with pytest.raises(SignatureVerificationError, match="has no signature"):
        runtimes.load(pkg, verify=False)
    proc = run_cli("run", str(pkg), "-i", str(pkg / "golden/inputs.npz"), "-o", str(tmp_path / "b.npz"), "-q")
    assert proc.returncode == 2 and "has no signature" in proc.stderr and PUBLIC_KEY_ENV in proc.stderr
    _no_traceback(proc)
    proc = run_cli("verify", str(pkg), "--integrity-only")
    assert proc.returncode == 2 and "has no signature" in proc.stderr
    # public_key=False opts one call out (what 'packager sign' itself uses).
    Package(pkg, public_key=False)


def test_added_and_removed_files_are_detected(pkg: Path, keys: dict) -> None:
    public = keys["alice"][1]
    (pkg / "notes.txt").write_text("planted")
    Package(pkg)  # top-level extras pass the checksum check ...
    with pytest.raises(SignatureVerificationError) as info:  # ... but not the signature
        verify_signature(pkg, public)
    assert "'notes.txt'" in info.value.message and "added" in info.value.message
    (pkg / "notes.txt").unlink()
    (pkg / "onnx" / "extra.bin").write_bytes(b"\0" * 8)
    with pytest.raises(SignatureVerificationError, match="onnx/extra.bin"):
        verify_signature(pkg, public)
    (pkg / "onnx" / "extra.bin").unlink()
    verify_signature(pkg, public)
    (pkg / "golden/inputs.npz").unlink()
    with pytest.raises(SignatureVerificationError) as info:
        verify_signature(pkg, public)
    assert "'golden/inputs.npz'" in info.value.message and "removed" in info.value.message


# --- archives -----------------------------------------------------------------------------------


def test_pack_keeps_the_signature_and_the_archive_verifies(pkg: Path, keys: dict, tmp_path: Path) -> None:
    private, public = keys["alice"]
    (pkg / "README.txt").write_text("about this model")  # a top-level file the signature covers
    sign(pkg, private, overwrite=True)
    archive = pack(pkg, tmp_path / "mlp.tar.gz").path
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {f"mlp/{SIGNATURE_NAME}", "mlp/README.txt", "mlp/manifest.json"} <= names
    assert pack(pkg, tmp_path / "again.tar.gz").path.read_bytes() == archive.read_bytes()  # still reproducible

    verify_signature(archive, public)
    Package(archive, public_key=public)
    runner = runtimes.load(archive, public_key=public)
    runner.close()
    assert (unpack(archive, tmp_path / "unpacked") / SIGNATURE_NAME).is_file()
    verify_signature(tmp_path / "unpacked", public)
    proc = run_cli("verify", str(archive), "--public-key", str(public), "--integrity-only")
    assert proc.returncode == 0 and "signature OK" in proc.stdout, proc.stderr
    proc = run_cli("run", str(archive), "-i", str(pkg / "golden/inputs.npz"), "-o", str(tmp_path / "y.npz"), "-q",
                   "--public-key", str(public))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("verify", str(archive), "--public-key", str(keys["mallory"][1]), "--integrity-only")
    assert proc.returncode == 2 and "another key" in proc.stderr
    _no_traceback(proc)


def test_an_archive_of_a_tampered_signed_package_fails(pkg: Path, keys: dict, tmp_path: Path) -> None:
    (pkg / "README.txt").write_text("added after signing")
    archive = pack(pkg, tmp_path / "mlp.tar.gz").path  # checksums pass, so pack accepts it
    with pytest.raises(SignatureVerificationError, match="README.txt"):
        Package(archive, public_key=keys["alice"][1])
    proc = run_cli("verify", str(archive), "--public-key", str(keys["alice"][1]))
    assert proc.returncode == 2 and "README.txt" in proc.stderr
    _no_traceback(proc)


def test_unsigned_archive_is_unchanged(unsigned_pkg: Path, tmp_path: Path) -> None:
    archive = pack(unsigned_pkg, tmp_path / "mlp.tar.gz").path
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames()}
    assert names == {"manifest.json"} | {f.path for f in Package(unsigned_pkg).manifest.all_files()}


# --- runtimes.load ------------------------------------------------------------------------------


def test_runtimes_load_with_public_key(pkg: Path, keys: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    public = keys["alice"][1]
    runner = runtimes.load(pkg, public_key=public)
    inputs, outputs = Package(pkg).golden()
    got = runner.run(inputs)
    for name, want in outputs.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)
    runner.close()
    with pytest.raises(SignatureVerificationError, match="another key"):
        runtimes.load(pkg, public_key=keys["mallory"][1])
    # The key is checked even when checksums are skipped.
    _flip(pkg / "onnx/model.onnx", at=-1)
    with pytest.raises(SignatureVerificationError, match="onnx/model.onnx"):
        runtimes.load(pkg, public_key=public, verify=False)
    # A bare artifact carries no signature: refused when a signed package is required.
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    with pytest.raises(SignatureVerificationError, match="bare artifact"):
        runtimes.load(pkg / "onnx/model.onnx")


# --- bad keys and paths --------------------------------------------------------------------------


def test_unusable_keys_and_paths_are_clear_errors(pkg: Path, keys: dict, tmp_path: Path) -> None:
    private, public = keys["alice"]
    with pytest.raises(InputError, match="does not exist"):
        verify_signature(pkg, tmp_path / "nope.pem")
    with pytest.raises(InputError, match="cannot be used to verify"):
        verify_signature(pkg, private)  # a private key where the public one belongs
    with pytest.raises(InputError, match="cannot be used to sign"):
        sign(pkg, public, overwrite=True)
    with pytest.raises(InputError, match="does not exist"):
        sign(pkg, tmp_path / "nope.pem", overwrite=True)
    archive = pack(pkg, tmp_path / "mlp.tar.gz").path
    with pytest.raises(InputError, match="only package folders are signed"):
        sign(archive, private)
    verify_signature(pkg, public)  # nothing above touched the signature
    proc = run_cli("verify", str(pkg), "--public-key", str(tmp_path / "nope.pem"), "--integrity-only")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    _no_traceback(proc)


def test_a_damaged_package_is_not_signed(unsigned_pkg: Path, keys: dict, tmp_path: Path) -> None:
    pkg = shutil.copytree(unsigned_pkg, tmp_path / "mlp")
    _flip(pkg / "onnx/model.onnx")
    with pytest.raises(IntegrityError, match="onnx/model.onnx"):
        sign(pkg, keys["alice"][0])
    assert not (pkg / SIGNATURE_NAME).exists()


def test_missing_library_is_a_dependency_error_with_the_fix(signed_pkg: Path, keys: dict) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "model_signing":
                    raise ImportError("model_signing is blocked")
                return None

        sys.meta_path.insert(0, Block())
        from packager.errors import DependencyError
        from packager.package import Package
        Package({str(signed_pkg)!r})  # no key: the library is not needed
        try:
            Package({str(signed_pkg)!r}, public_key={str(keys["alice"][1])!r})
        except DependencyError as exc:
            print(exc.exit_code, exc.message)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2 module 'model_signing'") and "pip install 'packager[sign]'" in proc.stdout, \
        proc.stdout
