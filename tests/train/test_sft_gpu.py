"""`deepwish sft` on a GPU: the fused loss (given only the assistant rows) under bf16 autocast, the
example chats learned (run on the device machine: pytest -m gpu tests/train/test_sft_gpu.py -s)."""
import json

import pytest

from deepwish.cli import main


@pytest.mark.gpu
def test_sft_on_gpu_with_the_fused_loss_learns_the_example_chats(cuda, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--preset", "qwen3_tiny", "--data", "examples/chat.jsonl", "--out", str(out),
                 "--set", "train.steps=120", "--set", "train.lr=0.01", "--set", "train.muon_lr=0.03",
                 "--set", "train.eval_every=40", "--set", "train.device=cuda", "--sample-tokens", "24"]) == 0
    text = capsys.readouterr().out
    print(text[-2000:])
    assert "loss backend triton" in text
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in train if m["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses  # the replies of the training chats are learned
