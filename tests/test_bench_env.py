"""bench/env.py: the command a benchmark records is the one the user typed, once."""
import pytest

from deepwish.bench.env import bench_environment


@pytest.mark.parametrize("argv, expect", [
    (["deepwish", "bench", "attention", "--out", "d"], "deepwish bench attention --out d"),       # the CLI
    (["/x/attention.py", "--out", "d"], "deepwish bench attention --out d"),                      # python -m
    (["deepwish", "bench", "attentions", "--out", "d"], "deepwish bench attention bench attentions --out d"),
])
def test_recorded_command_names_the_subcommand_once(monkeypatch, argv, expect):
    monkeypatch.setattr("sys.argv", argv)
    env = bench_environment("cpu", "deepwish bench attention", extra=1)
    assert env["command"] == expect and env["extra"] == 1 and env["device"] == "cpu"
