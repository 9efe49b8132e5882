"""The CPU goal: a tiny model SFT-trained on single-digit addition, then GRPO, raises held-out
pass@1 by a clear margin in a fixed number of steps.

The demonstrations are imperfect on purpose, as real ones are: half of them give the bare number
("8") instead of the required final "answer: 8". Warm-up (assistant tokens only, prompt targets
ignored) learns the sums and both formats; the exact checker rewards only "answer: N", so GRPO
must learn the format from reward alone, a behaviour shared by every problem, and held-out
problems (disjoint from the train split) improve with it. Everything is seeded: deterministic.
"""
import random

import pytest

from deepwish.config import load_config
from deepwish.rl.tasks import Arithmetic, Problem
from deepwish.rl.trainer import GRPOConfig, apply_rl_overrides, train_grpo


class ImperfectDemos(Arithmetic):
    """Addition whose reference answers drop the `answer:` prefix half of the time."""

    def draw(self, rng: random.Random) -> Problem:
        p = super().draw(rng)
        return Problem(p.prompt, p.answer.split()[-1]) if rng.random() < 0.5 else p


MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=32",
         "model.d_ff=128", "model.vocab_size=32", "model.max_seq_len=64"]
TRAIN = ["train.optimizer=adamw", "train.lr=7e-4", "train.schedule=constant", "train.warmup_steps=0",
         "train.steps=20", "train.log_every=5", "train.save_every=20", "train.device=cpu", "train.seed=0"]
RL = ["tokenizer=char", "prompts_per_step=16", "group_size=8", "max_new_tokens=12", "micro_batch=64",
      "eval_prompts=20", "eval_samples=16", "eval_every=10", "sft_steps=300", "sft_lr=3e-3", "sft_batch=32"]


def run_cpu_goal(out_dir: str) -> dict:
    cfg = load_config("qwen3_tiny", [f"train.out_dir={out_dir}", *MODEL, *TRAIN])
    return train_grpo(cfg, apply_rl_overrides(GRPOConfig(), RL), task=ImperfectDemos(seed=0, max_operand=9))


def test_grpo_raises_heldout_pass_at_1_over_sft(tmp_path):
    summary = run_cpu_goal(str(tmp_path / "run"))
    sft = summary["sft_losses"]
    assert sft[-1] < 0.3 * sft[0]  # the warm-up learned the task
    held = summary["heldout"]
    before, after = held[0]["heldout_pass@1"], held[20]["heldout_pass@1"]
    assert before < 0.4  # the warm model answers half of the time without the required format
    assert after >= before + 0.2, held  # measured: 0.27 -> 0.61
    assert held[20]["heldout_greedy"] >= held[0]["heldout_greedy"]
