"""Calibration text the model wrote is kept on this machine (quipc/calibration_cache.py): the
next compile of the same model with the same settings reads the same windows back without the
model writing them; anything the text depends on changes the key; a damaged or unwritable cache
never stops a compile."""
import os

import pytest
import torch
from spies import count_calls

from quipc.calibration_stage import calibration_windows
from quipc.compile import CalibConfig
from quipc.frontend import calibration
from quipc.frontend.models import resolve
from quipc.frontend.streaming import open_streamed

CALIB = CalibConfig(windows=4, length=16, batch=4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("QUIPC_NO_CACHE", raising=False)
    monkeypatch.setenv("QUIPC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration"


@pytest.fixture
def counted(monkeypatch):
    """How often the model wrote free text."""
    return count_calls(monkeypatch, calibration, "free_windows")


def _windows(model, calib=CALIB, seed=3):
    source = resolve(str(model))
    stream, tokenizer = open_streamed(source)
    return calibration_windows(stream, tokenizer, calib, seed, "cpu", False, source=source)


def test_the_next_compile_reads_the_windows_back(tiny_model, cache, counted):
    first, info = _windows(tiny_model[0])
    assert len(counted) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    again, info_again = _windows(tiny_model[0])
    assert len(counted) == 1   # not written again
    assert torch.equal(again, first) and info_again == info


@pytest.mark.parametrize("change", ["seed", "windows", "threads", "model file"])
def test_what_the_text_depends_on_changes_the_key(tiny_model, cache, counted, change, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model[0], model)
    _windows(model)
    calib, seed, threads = CALIB, 3, torch.get_num_threads()
    if change == "seed":
        seed = 4
    elif change == "windows":
        calib = CalibConfig(windows=6, length=16, batch=4)
    elif change == "threads":
        torch.set_num_threads(threads + 1)
    else:
        config = model / "config.json"
        config.write_text(config.read_text() + " ")
    try:
        _windows(model, calib, seed)
    finally:
        torch.set_num_threads(threads)
    assert len(counted) == 2 and len(list(cache.glob("*.safetensors"))) == 2


def test_a_damaged_cache_file_is_written_again(tiny_model, cache, counted):
    first, _ = _windows(tiny_model[0])
    (kept,) = cache.glob("*.safetensors")
    kept.write_bytes(b"not a safetensors file")
    again, _ = _windows(tiny_model[0])
    assert len(counted) == 2 and torch.equal(again, first)
    third, _ = _windows(tiny_model[0])   # the rewritten file is read
    assert len(counted) == 2 and torch.equal(third, first)


def test_an_unwritable_cache_warns_and_the_compile_goes_on(tiny_model, tmp_path, monkeypatch, counted):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.delenv("QUIPC_NO_CACHE", raising=False)
    monkeypatch.setenv("QUIPC_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not keep the calibration text"):
        windows, _ = _windows(tiny_model[0])
    assert windows.shape == (CALIB.windows, CALIB.length) and len(counted) == 1


def test_no_cache_writes_every_time(tiny_model, cache, counted, monkeypatch):
    monkeypatch.setenv("QUIPC_NO_CACHE", "1")
    _windows(tiny_model[0])
    _windows(tiny_model[0])
    assert len(counted) == 2 and not cache.exists()


def test_a_compile_at_another_width_reads_the_text_the_first_wrote(tiny_model, cache, counted, tmp_path):
    import json

    from quipc.compile import compile_model
    from quipc.config import QuantConfig

    for bits in (2, 3):
        compile_model(str(tiny_model[0]), tmp_path / f"w{bits}", QuantConfig(bits=bits, seed=3), CALIB, progress=False)
    assert len(counted) == 1
    sha = [json.loads((tmp_path / f"w{b}" / "manifest.json").read_text())["calibration"]["tokens_sha256"]
           for b in (2, 3)]
    assert sha[0] == sha[1]
