"""`deepwish grpo` end to end on CPU: preset + warm-up, then --init-from that run, then exact resume."""
import json

import torch

from deepwish.cli import main
from deepwish.train.checkpoint import load_checkpoint

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.n_heads=2", "--set",
        "model.n_kv_heads=1", "--set", "model.head_dim=16", "--set", "model.d_ff=64", "--set", "model.vocab_size=32",
        "--set", "model.max_seq_len=64", "--set", "train.device=cpu"]
RL = ["--rl", "prompts_per_step=4", "--rl", "group_size=4", "--rl", "max_new_tokens=8", "--rl", "eval_prompts=4",
      "--rl", "eval_samples=2", "--rl", "eval_every=2"]


def test_grpo_cli_init_from_and_exact_resume(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["grpo", "--preset", "qwen3_tiny", *TINY, *RL, "--tokenizer", "char", "--task", "arithmetic",
                 "--rl", "sft_steps=3", "--set", "train.steps=1", "--out", str(a)]) == 0
    assert (a / "grpo.png").is_file() and json.loads((a / "grpo.json").read_text())["tokenizer"] == "char"
    # from the first run's weights (its model section and character tokenizer), 4 steps in one go ...
    common = ["--task", "arithmetic", *RL, "--set", "train.device=cpu", "--set", "train.lr=1e-3"]
    assert main(["grpo", "--init-from", str(a), *common, "--set", "train.steps=4", "--out", str(b)]) == 0
    # ... equal 2 steps, then a resume to 4
    part = tmp_path / "part"
    assert main(["grpo", "--init-from", str(a), *common, "--set", "train.steps=2", "--out", str(part)]) == 0
    assert main(["grpo", "--resume", str(part), "--set", "train.steps=4"]) == 0
    full, resumed = load_checkpoint(b)["model"], load_checkpoint(part)["model"]
    assert load_checkpoint(part)["step"] == 4
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    out = capsys.readouterr().out
    assert "grpo 4: reward" in out and "mismatch 0.0000" in out
    recs = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("reward", "pass@1", "completion_len", "clip_frac", "entropy", "kl", "mismatch", "rollout_tok_s"):
        assert all(key in r for r in train), key
    assert {r["step"] for r in recs if r["kind"] == "val"} == {0, 2, 4}


def test_grpo_cli_errors(tmp_path, capsys):
    assert main(["grpo", "--task", "arithmetic"]) == 2
    assert "needs --init-from" in capsys.readouterr().err
    assert main(["grpo", "--preset", "qwen3_tiny", *TINY, "--tokenizer", "char", "--task", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["grpo", "--preset", "qwen3_tiny", *TINY, "--task", "arithmetic", "--out", str(tmp_path / "y")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["grpo", "--preset", "qwen3_tiny", *TINY, "--tokenizer", "char", "--rl", "group_size=1",
                 "--out", str(tmp_path / "z")]) == 2
    assert "group_size" in capsys.readouterr().err
    assert main(["grpo", "--preset", "qwen3_tiny", *TINY, "--tokenizer", "char", "--set", "train.residual_dtype=bf16",
                 "--out", str(tmp_path / "w")]) == 2  # a training-loop setting GRPO's own forwards do not take
    assert "train.residual_dtype='bf16'" in capsys.readouterr().err


def test_grpo_says_when_every_completion_is_truncated_and_masked(tmp_path, capsys):
    """One token per completion never reaches the task's stop: with loss.mask_truncated (the default)
    the step has no loss token, and the run says why, once; without the mask it says nothing."""
    args = ["grpo", "--preset", "qwen3_tiny", *TINY, *RL, "--tokenizer", "char", "--task", "arithmetic",
            "--rl", "max_new_tokens=1", "--set", "train.steps=2"]
    assert main([*args, "--out", str(tmp_path / "masked")]) == 0
    out = capsys.readouterr().out
    assert out.count("every completion reached max_new_tokens=1 without a stop token") == 1 and "trunc 1.00 | kept " in out
    recs = [json.loads(l) for l in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_tokens"] for r in recs if r["kind"] == "train"] == [0, 0]
    assert main([*args, "--rl", "loss.mask_truncated=false", "--out", str(tmp_path / "kept")]) == 0
    assert "every completion reached" not in capsys.readouterr().out
