import json

import jsonschema
import pytest

from packager.errors import ManifestError, SchemaVersionError
from packager.manifest import SCHEMA_VERSION, json_schema, load_manifest, parse_manifest


def _data(package):
    return json.loads((package / "manifest.json").read_text())


def test_manifest_records_signature_versions_checksums(torch_cnn_package):
    manifest = load_manifest(torch_cnn_package)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.source.framework == "torch"
    assert {"torch", "onnxruntime", "torchscript", "torch_export"} <= set(manifest.versions)
    assert manifest.signature.inputs[0].shape == ("batch", 3, 32, 32)
    assert manifest.signature.outputs[0].shape == ("batch", 10)
    for art in manifest.artifacts:
        assert art.files and all(len(f.sha256) == 64 and f.size > 0 for f in art.files)
        assert art.parity and art.parity[0].passed
    assert manifest.golden.inputs.path.endswith(".npz")


def test_json_schema_validates_a_real_manifest(torch_cnn_package):
    jsonschema.validate(_data(torch_cnn_package), json_schema())


def test_newer_schema_is_refused_with_versions(torch_cnn_package):
    data = _data(torch_cnn_package)
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError) as info:
        parse_manifest(data)
    assert str(SCHEMA_VERSION + 1) in info.value.message and f"<= {SCHEMA_VERSION}" in info.value.message


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("signature"), "signature"),
    (lambda d: d["artifacts"][0]["files"][0].update(sha256="xyz"), "artifacts.0.files.0.sha256"),
    (lambda d: d["signature"]["inputs"][0].update(dtype="float99"), "signature.inputs.0.dtype"),
    (lambda d: d.update(surprise=1), "surprise"),
    # found by tests/test_fuzz.py: a name longer than the file system allows crashed the stat
    (lambda d: d["artifacts"][0]["files"][0].update(path="x" * 300), "artifacts.0.files.0.path"),
    (lambda d: d["artifacts"][0]["files"][0].update(path="onnx//model.onnx"), "artifacts.0.files.0.path"),
])
def test_invalid_manifest_error_names_the_field(torch_cnn_package, mutate, field):
    data = _data(torch_cnn_package)
    mutate(data)
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    assert f"'{field}'" in info.value.message


def test_missing_schema_version(torch_cnn_package):
    data = _data(torch_cnn_package)
    del data["schema_version"]
    with pytest.raises(ManifestError, match="schema_version"):
        parse_manifest(data)


def test_schema_2_manifests_without_noise_still_load_and_verify(torch_cnn_package, tmp_path):
    """A package written before the noise record (schema 2) verifies with the default bounds."""
    import shutil

    import packager
    from packager.manifest import MANIFEST_NAME

    pkg = tmp_path / "pkg"
    shutil.copytree(torch_cnn_package, pkg)
    data = json.loads((pkg / MANIFEST_NAME).read_text())
    assert data["schema_version"] == 3 and data["golden"]["noise"]
    data["schema_version"] = 2
    del data["golden"]["noise"]
    (pkg / MANIFEST_NAME).write_text(json.dumps(data))
    assert packager.Package(pkg).manifest.golden.noise == {}
    assert packager.verify(str(pkg), formats=["onnx"]).exit_code == 0
