"""The GPT family through the command line: gpt_tiny and gpt_moe_tiny train and generate (a few
steps), and `deepwish convert` refuses the family in one clear line."""
import pytest
import torch

from deepwish.cli import main

SHORT = ["--set", "train.steps=4", "--set", "train.eval_every=4", "--set", "train.save_every=4",
         "--set", "train.batch_size=2", "--set", "train.seq_len=160", "--set", "train.eval_batches=1",
         "--set", "train.sample_tokens=4", "--set", "model.n_layers=2"]


@pytest.mark.parametrize("preset", ["gpt_tiny", "gpt_moe_tiny"])
def test_train_generate_and_convert_refusal(preset, tmp_path, capsys):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert main(["train", "--preset", preset, "--out", str(run), *SHORT]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "KING:", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KING:") and len(out) > len("KING:\n")
    assert main(["convert", str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HF export is not supported for family 'gpt'" in errors[0]
    assert not (tmp_path / "hf").exists()
