import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny.py
# every compile writes its calibration text anew (tests/test_calibration_cache.py turns the
# machine's cache on, in a folder of its own), so that no test reads another's
os.environ["QUIPC_NO_CACHE"] = "1"

# 2 threads, or the cores shared among pytest-xdist's worker processes (scripts/test.sh)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tiny import make_tiny_llama, write_text

    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "model"), write_text(root / "calib.txt")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory):
    """A 3-bit QuIP artifact of the tiny model (compiled once per session)."""
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    model, text = tiny_model
    out = tmp_path_factory.mktemp("art") / "w3"
    compile_model(str(model), out, QuantConfig(bits=3, seed=1), CalibConfig(text=str(text), windows=8, length=32),
                  progress=False)
    return out


@pytest.fixture(scope="session")
def tied_w3(tiny_model, tmp_path_factory):
    """A 3-bit artifact of the tiny (tied) model with a 4-bit grid lm_head, which is also its
    embedding (tests/test_head.py, test_head_lowered.py)."""
    from quipc.compile import CalibConfig, compile_model
    from quipc.config import QuantConfig

    model, text = tiny_model
    out = tmp_path_factory.mktemp("head") / "w3h4"
    compile_model(str(model), out, QuantConfig(bits=3, seed=1, head_bits=4),
                  CalibConfig(text=str(text), windows=8, length=32), progress=False)
    return out
