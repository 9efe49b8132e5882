"""Post-training with verifiable rewards: tasks, rollouts, the GRPO loss and its trainer."""
