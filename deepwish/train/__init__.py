"""Training: loop.py (the single-device trainer, `train(run_cfg, resume)`), optim.py (Muon +
AdamW groups), schedule.py, loss.py, checkpoint.py, log.py, plot.py, nonfinite.py.
Multi-GPU wrapping belongs in parallel.py (wrap_model in loop.py is the hook). Import the submodules directly."""
