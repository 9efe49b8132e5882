"""MLflow end to end against a real tracking server (sqlite backend, proxied artifact store),
started by the test on a free port of 127.0.0.1 and stopped afterwards: a tiny run trained
through the CLI, resumed, and continued with --mlflow-run-id is one MLflow run whose params,
metrics (continuing at the resumed step) and artifacts (config, plot) are read back with
MlflowClient."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from deepwish import cli

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "train.seq_len=32", "train.batch_size=2", "train.eval_batches=1", "train.sample_tokens=0",
        "train.log_every=1", "train.warmup_steps=1", "train.steps=2", "train.save_every=2", "train.eval_every=2",
        "train.mlflow=true", "train.mlflow_run_name=tiny"]
SERVER_START_DEADLINE_S = 120  # a timeout, not a measurement: a busy 2-core machine starts it in ~10 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """URL of a fresh `mlflow server`; its whole process group is stopped afterwards."""
    for var in ("NO_PROXY", "no_proxy"):  # the client must talk to 127.0.0.1 directly
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    port = _free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import mlflow  # noqa: F401  (the client and the trainer load while the server starts)

        import deepwish.train.loop  # noqa: F401
        deadline = time.monotonic() + SERVER_START_DEADLINE_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer within {SERVER_START_DEADLINE_S} s:\n"
                                     f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _train(*args: str) -> None:
    assert cli.main(["train", *args]) == 0


def test_train_resume_and_run_id_log_one_mlflow_run_on_a_server(mlflow_server, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-e2e")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    sets = [a for kv in TINY for a in ("--set", kv)]
    _train("--preset", "qwen3_tiny", "--out", str(run), *sets)
    saved = json.loads((run / "mlflow.json").read_text())
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["mlflow"]["run_id"] == saved["run_id"] and saved["tracking_uri"] == mlflow_server

    # --resume (the run's saved config, two more steps at the final rate): the same MLflow run.
    _train("--resume", str(run), "--set", "train.extend_steps=2")
    out = capsys.readouterr().out
    assert f"MLflow: continuing run {saved['run_id']}" in out
    assert "keeps its values of train.extend_steps" in out  # MLflow params cannot change

    # Another run directory logging into the same MLflow run by id (MLflow's own resumption).
    other = tmp_path / "other"
    _train("--preset", "qwen3_tiny", "--out", str(other), *sets, "--set", "train.steps=1", "--mlflow-run-id",
           saved["run_id"])

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tiny-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]  # one run
    r = runs[0]
    assert r.info.run_name == "tiny" and r.info.status == "FINISHED"
    assert r.data.params["model.d_model"] == "32" and r.data.params["train.extend_steps"] == "0"
    assert r.data.params["train.mlflow_run_name"] == "tiny"
    history = client.get_metric_history(r.info.run_id, "train_loss")
    steps = sorted(m.step for m in history)
    assert steps == [1, 1, 2, 3, 4]  # 1-2 first, 3-4 resumed, 1 from the run logging by id
    losses = {m.step: m.value for m in history if m.step > 1}
    logged = {json.loads(line)["step"]: json.loads(line)["loss"] for line in
              (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["kind"] == "train"}
    for s in (2, 3, 4):
        assert losses[s] == pytest.approx(logged[s], rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_val_loss")) == [1, 2, 4]
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.json", "plot.png"} <= artifacts
    config = json.loads(open(client.download_artifacts(r.info.run_id, "config.json", str(tmp_path / "dl"))).read())
    assert config["model"]["d_model"] == 32
