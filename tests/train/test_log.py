"""Progress logging: metrics.jsonl, MFU against the device peak table, guarded integrations, plot."""
import importlib.util
import json

import pytest
import torch

from deepwish.train import log as L
from deepwish.train.plot import plot_run


def test_peak_table_and_cpu_mfu_na(tmp_path, capsys):
    assert L.device_peak_flops(torch.device("cpu"))[0] is None
    assert dict((k, v) for k, v, _ in L.PEAK_BF16_FLOPS)["H100"] == 777e12
    lg = L.Logger(tmp_path, total_steps=4, flops_per_token=1e6, device=torch.device("cpu"), log_every=2,
                  progress_bar=False)
    lg.start(0)
    for s in range(1, 5):
        rec = lg.step(s, 100, {"loss": 5.0 - s, "lr": 1e-3, "grad_norm": 0.5, "aux/moe": 0.01})
        assert (rec is None) == (s % 2 == 1)
    lg.eval(4, {"val_loss": 1.5})
    lg.write({"kind": "final", "step": 4, "val_loss": 1.5, "unigram_entropy": 3.0})
    lg.close()
    out = capsys.readouterr().out
    assert "step 4/4 | loss 1.0000" in out and "MFU n/a" in out and "tok/s" in out and "aux/moe 0.0100" in out
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["train", "train", "val", "final"]
    assert recs[1]["tok_s"] > 0 and recs[1]["mfu"] is None and recs[1]["peak_mem_gib"] > 0
    png = plot_run(tmp_path)
    assert png.exists() and png.stat().st_size > 1000


def test_mfu_uses_the_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "device_peak_flops", lambda d: (1e9, "test peak"))
    lg = L.Logger(tmp_path, total_steps=2, flops_per_token=1e3, device=torch.device("cpu"), log_every=1,
                  progress_bar=False)
    lg.start(0)
    rec = lg.step(1, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})
    lg.close()
    assert rec["mfu"] == pytest.approx(rec["tok_s"] * 1e3 / 1e9)


def test_paused_time_is_not_on_the_training_clock(tmp_path, monkeypatch):
    """An evaluation (or save) between steps does not lower the logged tok/s."""
    now = [100.0]
    monkeypatch.setattr(L.time, "perf_counter", lambda: now[0])
    lg = L.Logger(tmp_path, total_steps=3, flops_per_token=1.0, device=torch.device("cpu"), log_every=1,
                  progress_bar=False)
    lg.start(0)
    now[0] += 2.0
    assert lg.step(1, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})["tok_s"] == pytest.approx(500.0)
    with lg.paused():  # a 30-second evaluation
        now[0] += 30.0
    now[0] += 2.0
    assert lg.step(2, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})["tok_s"] == pytest.approx(500.0)
    now[0] += 6.0  # a slower step does lower it: only paused time is left out
    assert lg.step(3, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})["tok_s"] == pytest.approx(300.0)
    lg.close()


def test_each_record_carries_its_own_steps_rate(tmp_path, monkeypatch):
    """tok_s is the rate over the last `window` steps, so one slow first step (a kernel compiled on
    first use) stays in it for that long; step_s / step_tok_s / step_mfu are the record's own step
    alone (paused time left out)."""
    now = [100.0]
    monkeypatch.setattr(L.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(L, "device_peak_flops", lambda d: (1e6, "test peak"))
    lg = L.Logger(tmp_path, total_steps=3, flops_per_token=1.0, device=torch.device("cpu"), log_every=1,
                  progress_bar=False)
    lg.start(0)
    now[0] += 10.0   # slow first step
    r1 = lg.step(1, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})
    now[0] += 1.0
    r2 = lg.step(2, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})
    with lg.paused():
        now[0] += 30.0
    now[0] += 1.0
    r3 = lg.step(3, 1000, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})
    lg.close()
    assert r1["step_s"] == pytest.approx(10.0) and r1["step_tok_s"] == pytest.approx(100.0)
    assert r2["tok_s"] == pytest.approx(2000 / 11) and r2["step_tok_s"] == pytest.approx(1000.0)
    assert r3["step_s"] == pytest.approx(1.0) and r3["step_mfu"] == pytest.approx(1000.0 / 1e6)


@pytest.mark.parametrize("flag,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_optional_integrations(tmp_path, flag, module, monkeypatch):
    # a user-chosen file store (MLflow 3 refuses those unless MLFLOW_ALLOW_FILE_STORE=true)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    kw = dict(total_steps=1, flops_per_token=1.0, device=torch.device("cpu"), log_every=1, progress_bar=False)
    if importlib.util.find_spec(module) is None:
        with pytest.raises(ImportError, match=f"train.{flag}=true needs the '{module}' package"):
            L.Logger(tmp_path, **{flag: True}, **kw)
    else:
        lg = L.Logger(tmp_path, **{flag: True}, **kw)
        lg.start(0)
        lg.step(1, 10, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})
        lg.close()
        assert any((tmp_path / d).exists() for d in ("tensorboard", "store"))
        if flag == "mlflow":
            import mlflow
            assert mlflow.get_experiment_by_name("from-env") is not None


def test_plot_needs_metrics(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path)


class FakeMlflow3:
    """The slice of the MLflow 3 client the logger uses, with MLflow 3's refusal of file stores
    unless MLFLOW_ALLOW_FILE_STORE=true."""

    def __init__(self):
        self.calls = []

    def set_tracking_uri(self, uri):
        self.calls.append(("uri", uri))

    def set_experiment(self, experiment_name=None, experiment_id=None):
        import os
        uri = next(v for k, v in self.calls if k == "uri")
        if L.is_file_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise RuntimeError("The filesystem tracking backend (e.g., './mlruns') is no longer supported.")
        self.calls.append(("experiment", experiment_name or f"id:{experiment_id}"))

    def start_run(self, run_name=None, run_id=None):
        from types import SimpleNamespace
        self.calls.append(("run", run_name or f"id:{run_id}"))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id or "r1", experiment_id="e1"))

    def get_run(self, run_id):
        from types import SimpleNamespace
        return SimpleNamespace(data=SimpleNamespace(params={}))

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls += [("metric", k) for k in metrics]

    def log_artifact(self, path):
        self.calls.append(("artifact", path))

    def end_run(self, status="FINISHED"):
        self.calls.append(("end", status))


@pytest.mark.parametrize("config_name,env,want", [
    ("", {}, "deepwish"),
    ("id=7", {"MLFLOW_EXPERIMENT_ID": "42"}, "id:7"),
    ("from-config", {"MLFLOW_EXPERIMENT_NAME": "from-env"}, "from-config"),
    ("", {"MLFLOW_EXPERIMENT_NAME": "from-env"}, "from-env"),
    ("", {"MLFLOW_EXPERIMENT_ID": "42"}, "id:42"),
])
def test_mlflow3_user_file_store_and_experiment(tmp_path, monkeypatch, config_name, env, want):
    import sys
    fake = FakeMlflow3()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    for k in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())  # a user-chosen file store
    lg = L.Logger(tmp_path, total_steps=1, flops_per_token=1.0, device=torch.device("cpu"), log_every=1,
                  progress_bar=False, mlflow=True, config={"train": {
                      "mlflow_experiment": "" if config_name.startswith("id=") else config_name,
                      "mlflow_experiment_id": config_name[3:] if config_name.startswith("id=") else ""}})
    lg.start(0)
    lg.step(1, 10, {"loss": 1.0, "lr": 1.0, "grad_norm": 1.0})
    lg.close()
    assert ("experiment", want) in fake.calls and ("metric", "train_loss") in fake.calls


def test_file_store_uris():
    assert L.is_file_store("file:///tmp/x") and L.is_file_store("./mlruns") and L.is_file_store("/abs/mlruns")
    assert not L.is_file_store("sqlite:///mlflow.db") and not L.is_file_store("http://host:5000")
