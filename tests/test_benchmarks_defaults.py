"""benchmarks/defaults.py: the README's table of the defaults reads its figures from the records
it names, and a row without its record is refused."""
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def defaults(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import defaults as mod

    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    return mod


def _table(agreement):
    return {"fp32": {"total_mb": 538.0, "ppl": 20.82},
            "rows": [{"label": "w2", "bits": 2, "calib": "data-free", "blocks": "e8p", "total_mb": 41.95,
                      "bits_per_param": 2.495, "eval": "eval.json", "agreement": agreement,
                      "france": "Paris", "host": "Some CPU", "stop": 1}]}


def test_figures_come_from_the_records(defaults, tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"ppl": 57.123}))
    (tmp_path / "agree.json").write_text(json.dumps([{"artifact": "/x/other", "rouge_l": 0.1},
                                                     {"artifact": "/x/art", "rouge_l": 0.3456}]))
    rows = defaults.rows(_table(["agree.json", "art"]))
    assert rows[0]["ppl"] == 57.123 and rows[0]["rouge_l"] == 0.3456
    text = defaults.markdown(_table(None), rows)
    assert "| `--bits 2` (data-free) | e8p | 41.95 | 2.495 | 57.12 | 0.346 | Paris | Some CPU, stop 1 |" in text


def test_a_row_without_its_record_is_refused(defaults, tmp_path):
    with pytest.raises(SystemExit, match="eval.json"):
        defaults.rows(_table(None))
    (tmp_path / "eval.json").write_text(json.dumps({"ppl": 50.0}))
    (tmp_path / "agree.json").write_text(json.dumps([{"artifact": "/x/other", "rouge_l": 0.1}]))
    with pytest.raises(SystemExit, match="no single row for artifact 'art'"):
        defaults.rows(_table(["agree.json", "art"]))


def test_the_committed_table_reads():
    """Every row of benchmarks/results/defaults.json names records that are committed."""
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        import defaults as mod
        table = json.loads((BENCH / "results" / "defaults.json").read_text())
        assert len(mod.rows(table)) == len(table["rows"]) >= 6
    finally:
        sys.path.remove(str(BENCH))
