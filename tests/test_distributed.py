"""A compile spread over 2 ranks (torch.distributed, gloo on loopback; started by torchrun through
`quipc compile --workers 2`, or as torch.multiprocessing processes) writes the same bytes as one
process; a rank that dies stops the job with a clear error on rank 0 and leaves a folder that
--resume finishes."""
import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from quipc.compile import CalibConfig, compile_model
from quipc.config import CLI_HEAD_FORMAT, CLI_HEAD_REFIT_DAMP, QuantConfig

# the CLI's defaults (e8p codes, 4-bit tied head = embedding, e2e fine-tuning), data-free:
# windows 10 in batches of 4 = 3 batches, so the ranks hold unequal shares; fine-tuning steps of
# 3 windows (9 trained, 1 held out): 2 on rank 0 and 1 on rank 1
# (head_format: the CLI's default, so that `quipc compile --workers 2` below computes the same)
CFG = QuantConfig(bits=2, format="e8p", finetune="e2e", finetune_epochs=1, head_bits=4, head_format=CLI_HEAD_FORMAT,
                  seed=3, head_refit_damp=CLI_HEAD_REFIT_DAMP[2],   # the bare command's, data-free w2
                  finetune_step_windows=3)
CALIB = CalibConfig(windows=10, length=16, batch=4)


def digest(folder) -> dict:
    """Every data file's sha256 and the manifest, less what measures time (a dict, so that a
    failed comparison names the part that differs)."""
    import hashlib

    parts = {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(folder.rglob("*.safetensors"))}
    man = json.loads((folder / "manifest.json").read_text())
    man.pop("compile_seconds")
    man["finetune"].pop("seconds")
    man["head_refit"].pop("seconds")
    for key in ("total_bytes", "bits_per_param", "pad"):   # count the manifest (and its seconds)
        man["summary"].pop(key, None)
    parts.update({f"manifest.{key}": json.dumps(value, sort_keys=True) for key, value in man.items()})
    return parts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, model: str, out: str, report: str, die_in_block: int | None,
          resume: bool):
    """One rank, as torchrun would start it (its environment), one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if die_in_block is not None and rank == 1:
        import quipc.passes.sequential as seq

        real = seq.quantize_linear

        def killed(inp, cfg):
            if f".{die_in_block}." in inp.name:
                os._exit(9)   # as if killed: no cleanup, no message
            return real(inp, cfg)

        seq.quantize_linear = killed
    from quipc.distributed import leave

    outcome = "ok"
    try:
        compile_model(model, out, CFG, CALIB, resume=resume, progress=False)
    except Exception as err:  # noqa: BLE001 - reported to the test
        outcome = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    finally:
        leave(outcome == "ok")
    with open(f"{report}.{rank}", "w") as f:
        f.write(outcome)


def _launch(world: int, model, out, report, die_in_block=None, resume=False) -> list[str]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(model), str(out), str(report), die_in_block, resume))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank did not finish")
    return [open(f"{report}.{r}").read() if os.path.exists(f"{report}.{r}") else f"exit {p.exitcode}"
            for r, p in enumerate(procs)]


def _compile_one_thread(model, out) -> None:
    """One process at one thread (as each rank runs in the tests here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compile_model(str(model), out, CFG, CALIB, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_rank(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "art"
    _compile_one_thread(tiny_model[0], out)
    return out


def test_two_ranks_write_the_same_bytes_as_one(tiny_model, one_rank, tmp_path):
    """`quipc compile --workers 2`: torchrun starts 2 ranks of `python -m quipc compile`."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "quipc", "--threads", "1", "compile", str(tiny_model[0]), "-o", str(tmp_path / "two"),
           "--workers", "2", "--bits", "2", "--seed", str(CFG.seed), "--finetune-epochs", str(CFG.finetune_epochs),
           "--finetune-step-windows", str(CFG.finetune_step_windows),
           "--calib-windows", str(CALIB.windows), "--calib-len", str(CALIB.length),
           "--calib-batch", str(CALIB.batch), "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1   # rank 0 reports, rank 1 stays quiet
    assert digest(tmp_path / "two") == digest(one_rank)
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["complete"] and "finetune" in man and man["calibration"]["source"] == "generated"


def test_a_killed_rank_leaves_a_resumable_folder(tiny_model, one_rank, tmp_path):
    out = tmp_path / "cut"
    outcome = _launch(2, tiny_model[0], out, tmp_path / "report", die_in_block=1)
    assert outcome[1] == "exit 9"
    assert outcome[0].startswith("RankFailed: rank 0: another rank of the compile stopped"), outcome[0]
    assert "--resume" in outcome[0].splitlines()[0]
    man = json.loads((out / "manifest.json").read_text())
    assert not man["complete"] and [b["index"] for b in man["blocks"]] == [0]
    assert _launch(2, tiny_model[0], out, tmp_path / "again", resume=True) == ["ok", "ok"]
    assert digest(out) == digest(one_rank)


def test_spilled_hessians_write_the_same_bytes(tiny_model, one_rank, tmp_path, monkeypatch):
    """Large Hessians wait on disk for their group's turn (here every group's but the first):
    the same artifact, and no spill folder left behind."""
    from quipc.passes import spread

    monkeypatch.setattr(spread, "SPILL_BYTES", 0)
    spilled = []
    real = spread._spill

    def counting(*a, **k):
        out = real(*a, **k)
        spilled.append(len(out))
        return out

    monkeypatch.setattr(spread, "_spill", counting)
    out = tmp_path / "spill"
    _compile_one_thread(tiny_model[0], out)
    assert spilled and all(k == 3 for k in spilled)   # o, gate/up and down of every block
    assert digest(out) == digest(one_rank)
    assert not (out / ".hessians").exists()


def _leaving_rank(rank: int, port: int, report: str):
    """Rank 1 stops (as if killed) once both joined; rank 0 then leaves as a finished compile does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from quipc.distributed import join, leave

    group = join()
    group.barrier()
    if rank == 1:
        os._exit(9)
    try:
        leave(finished=True)
        outcome = "ok"
    except Exception as err:  # noqa: BLE001 - reported to the test
        outcome = f"{type(err).__name__}: {err}"
    with open(report, "w") as f:
        f.write(outcome)


def test_a_finished_rank_whose_peer_stopped_says_so(tmp_path):
    """leave(finished=True) waits for every rank; one that stopped instead is a RankFailed that
    names --resume, not a hang or a native crash."""
    ctx = mp.get_context("spawn")
    port, report = _free_port(), tmp_path / "report"
    procs = [ctx.Process(target=_leaving_rank, args=(r, port, str(report))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 9]
    outcome = report.read_text()
    assert outcome.startswith("RankFailed: rank 0: another rank stopped before the end"), outcome
    assert "--resume" in outcome


def _calibration_rank(rank: int, world: int, port: int, model: str, text: str | None, report: str):
    """One rank writing the calibration windows (its parts), as compile_model does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from quipc.distributed import join, leave
    from quipc.frontend import chat_calibration

    chat_calibration.ANSWER_TOKENS = 8   # as the test sets it in its own process
    finished = False
    try:
        torch.save(_calibration_windows(model, text, join()), f"{report}.{rank}")
        finished = True
    finally:
        leave(finished)


def _calibration_windows(model: str, text: str | None, group=None):
    from quipc.calibration_stage import calibration_windows
    from quipc.frontend.models import resolve
    from quipc.frontend.streaming import open_streamed

    stream, tokenizer = open_streamed(resolve(model))
    calib = CalibConfig(text=text, windows=6, length=24, chat=0.5 if text else 0.0)
    kwargs = {} if group is None else {"group": group}
    return calibration_windows(stream, tokenizer, calib, 3, "cpu", False, **kwargs)


@pytest.mark.parametrize("with_text", [False, True], ids=["data-free", "text+chat"])
def test_two_ranks_write_the_calibration_text_of_one(tiny_model, tmp_path, with_text, monkeypatch):
    """The calibration's parts (free text or the file's windows, and conversations) are written
    by different ranks at once: every rank gets the windows one process writes."""
    import shutil

    from transformers import AutoTokenizer

    from quipc.frontend import chat_calibration
    from test_chat_calibration import TEMPLATE

    monkeypatch.setattr(chat_calibration, "ANSWER_TOKENS", 8)
    chat_model = tmp_path / "chat-model"
    shutil.copytree(tiny_model[0], chat_model)
    tok = AutoTokenizer.from_pretrained(chat_model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat_model)
    text = str(tiny_model[1]) if with_text else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, info = _calibration_windows(str(chat_model), text)
    finally:
        torch.set_num_threads(threads)
    assert info["chat_windows"] == 3 and one.shape == (6, 24)
    ctx = mp.get_context("spawn")
    port, report = _free_port(), tmp_path / "calib"
    procs = [ctx.Process(target=_calibration_rank, args=(r, 2, port, str(chat_model), text, str(report)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for r in range(2):
        windows, rank_info = torch.load(f"{report}.{r}", weights_only=False)
        assert torch.equal(windows, one) and rank_info == info


# SmolLM2's block: q, k, v (one input), o, gate, up (one input), down; e8p seconds per linear at
# one thread, measured (passes/spread.py)
SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOLLM2_GROUPS = [0, 0, 0, 1, 2, 2, 3]
SMOLLM2_SECONDS = [0.44, 0.14, 0.11, 0.35, 1.03, 0.86, 1.98]


@pytest.mark.parametrize("world", [2, 3])
def test_the_rounding_is_spread_evenly(world):
    """Every linear has one owner, every rank some work, and the busiest rank's measured seconds
    are within 15 % of an even share plus the largest linear's."""
    from quipc.passes.spread import assign

    owner = assign(SMOLLM2_BLOCK, SMOLLM2_GROUPS, world)
    assert sorted(set(owner)) == list(range(world))
    busiest = max(sum(s for s, o in zip(SMOLLM2_SECONDS, owner) if o == r) for r in range(world))
    bound = max(sum(SMOLLM2_SECONDS) / world, max(SMOLLM2_SECONDS))
    assert busiest <= 1.15 * bound, (owner, busiest)
    assert assign(SMOLLM2_BLOCK, SMOLLM2_GROUPS, 1) == [0] * len(SMOLLM2_BLOCK)
