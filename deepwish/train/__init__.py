"""Training: loop.py (the single-device trainer, `train(run_cfg, resume)`), optim.py (Muon +
AdamW groups), schedule.py, loss.py, checkpoint.py, log.py, plot.py, nonfinite.py.
Multi-GPU wrapping is applied from outside the model by parallel.py. Import the submodules directly."""
