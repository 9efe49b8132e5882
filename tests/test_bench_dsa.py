"""`deepwish bench dsa --tiny` on the CPU: every part runs, the fast and dense runs of the training
step see the same losses, and the results file and plot are written."""
import json

import pytest

from deepwish.cli import main


def test_bench_dsa_tiny_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "dsa"
    assert main(["bench", "dsa", "--out", str(out), "--tiny", "--device", "cpu", "--index-seq", "40",
                 "--train-seq", "24", "--decode-ctx", "20,40", "--layers", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "dsa.png").stat().st_size > 0
    assert [r["T"] for r in res["indexer"]] == [40] and "ms" in res["indexer"][0]["fast"]
    (train,) = res["train"]
    assert train["fast"]["ce"] == pytest.approx(train["dense"]["ce"], rel=1e-5)
    assert train["fast"]["indexer"] == pytest.approx(train["dense"]["indexer"], rel=1e-4, abs=1e-7)
    assert [r["ctx"] for r in res["decode"]] == [20, 40] and res["decode"][0]["fast_vs_first"] == 1.0
    (stage,) = res["stages"]  # on the CPU: the torch KL only
    assert stage["T"] == 24 and "ms" in stage["kl_fwd_bwd_torch"] and "ms" in stage["attention_fwd_bwd"]
    assert 0 < stage["kl_value_torch"] < 10
    text = capsys.readouterr().out
    assert "## training step" in text and "## decode" in text and "by piece" in text
