"""Artifact validation: tampering, truncation, paths outside the folder, unfinished writes."""
import json
import shutil

import pytest

import quipc
from quipc_runtime.artifact import ArtifactError, read_manifest


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(tiny_artifact, dst)
    return dst


def edit_manifest(folder, fn):
    path = folder / "manifest.json"
    man = json.loads(path.read_text())
    fn(man)
    path.write_text(json.dumps(man))


def test_tampered_block_is_refused(copy):
    path = copy / "blocks" / "block_0001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        quipc.load(copy)


def test_truncated_dense_is_refused(copy):
    path = copy / "dense.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupted"):
        quipc.load(copy)


def test_layer_checksum_is_checked(copy):
    def swap(man):
        layers = man["blocks"][0]["layers"]
        layers[0]["sha256"] = layers[1]["sha256"]
    edit_manifest(copy, swap)
    with pytest.raises(ArtifactError, match="checksum"):
        quipc.load(copy)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "blocks/../../x"])
def test_path_outside_folder_is_refused(copy, bad):
    edit_manifest(copy, lambda man: man["blocks"][0].__setitem__("file", bad))
    with pytest.raises(ArtifactError, match="outside"):
        read_manifest(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "quipc", "format_version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        read_manifest(tmp_path)


def test_missing_file(copy):
    (copy / "blocks" / "block_0000.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        quipc.load(copy)


def test_loaded_artifact_generates_with_the_kv_cache(tiny_artifact, copy):
    """A compile stores no use_cache (the frontend turns it off for calibration); the loader turns
    it on, also for artifacts that stored use_cache=False (written before): each generate() step
    after the prompt feeds one token, not the whole sequence."""
    import torch

    assert "use_cache" not in read_manifest(tiny_artifact)["model_config"]
    edit_manifest(copy, lambda m: m["model_config"].update(use_cache=False))   # as stored before
    for folder in (tiny_artifact, copy):
        model = quipc.load(folder)
        lengths = []
        model.model.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                              with_kwargs=True)
        ids = torch.tensor([[3, 4, 5, 6]])
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=0)
        assert lengths == [4, 1, 1, 1]
