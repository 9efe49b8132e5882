"""The command line end to end on a tiny run: train -> generate (plain, draft) -> convert -> HF
load -> plot, and one-line errors for bad input."""
import pytest
import torch

from deepwish.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "qwen3_tiny", "--out", str(d), "--set", "model.n_layers=1",
                 "--set", "train.steps=6", "--set", "train.eval_every=3", "--set", "train.save_every=3",
                 "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.sample_tokens=4"]) == 0
    return d


def test_generate_plain_and_speculative_agree_greedy(run_dir, capsys):
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "--ckpt", str(run_dir), "--draft", str(run_dir), "--prompt", "KING:",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and plain.startswith("KING:")
    assert "acceptance 100.0%" in captured.err


def test_convert_then_generate_from_hf_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(run_dir), str(out), "--dtype", "fp32"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "--hf", str(out), "--prompt", "KING:", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == a


def test_plot(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    assert list(run_dir.glob("*.png"))


def test_errors_are_one_line(run_dir, capsys):
    assert main(["train", "--preset", "qwen3_tiny", "--set", "model.n_layer=3"]) == 2
    assert "unknown key 'n_layer'" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "x", "--max-new-tokens", "5000"]) == 2
    assert "cache" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="multi-token-prediction"):
        main(["generate", "--ckpt", str(run_dir), "--mtp", "--prompt", "x"])
