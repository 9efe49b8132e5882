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


def test_doc_summary_joins_the_first_paragraph():
    from deepwish.bench.env import doc_summary
    assert doc_summary("Times the kernels against\n  the anchors.\n\n    python -m x\n") == "Times the kernels against the anchors."
    assert doc_summary(None) == ""


def test_every_benchmark_describes_itself_in_whole_sentences():
    """`--help`'s description is the module docstring's first paragraph: it ends a sentence (a first
    line alone cut ten of them mid-sentence)."""
    import importlib
    import pkgutil

    import deepwish.bench
    from deepwish.bench.env import doc_summary
    checked = 0
    for info in pkgutil.iter_modules(deepwish.bench.__path__):
        mod = importlib.import_module(f"deepwish.bench.{info.name}")
        if "doc_summary(__doc__)" not in open(mod.__file__).read():
            continue
        assert doc_summary(mod.__doc__).endswith((".", ":", ")")), (info.name, doc_summary(mod.__doc__))
        checked += 1
    assert checked >= 20  # every benchmark with a command line
