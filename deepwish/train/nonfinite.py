"""Find where a non-finite loss came from, then stop with an error that names the module.

When a step's loss or gradient norm is not finite, the trainer re-runs that same step (same
batch, parameters not yet updated) with hooks on every module:
- forward: the first module, in execution order, whose output holds a NaN/Inf (children finish
  before their parents, so the innermost culprit is reported);
- backward: the first module, in backward order, whose backward turned finite output
  gradients into non-finite input gradients, or whose parameter gradient went non-finite.
Nothing is saved after a non-finite step, so the last checkpoint remains the last good one.

Simplification: full backward hooks see gradients of a module's tensor inputs only; a culprit
inside a function that is not a module is reported as its nearest enclosing module.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn


class NonFiniteError(RuntimeError):
    """Raised when training produced a NaN/Inf; the message names the first offending module."""


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _bad(x) -> bool:
    return any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(x))


def locate_nonfinite(model: nn.Module, run_step: Callable[[], torch.Tensor]) -> str:
    """Re-run `run_step` (forward returning the loss; backward is done here) under hooks.

    Returns a description such as "forward output of module 'blocks.1.ffn.w_down'"; or of the
    loss itself when every module was finite. Gradients are zeroed before and after.
    """
    found: list[str] = []
    handles = []

    def fwd_hook(name):
        def hook(mod, args, out):
            if not found and _bad(out):
                kind = "forward output" if not _bad(args) else "forward output (inputs already non-finite)"
                found.append(f"{kind} of module '{name}' ({type(mod).__name__})")
        return hook

    def bwd_hook(name):
        def hook(mod, grad_input, grad_output):
            if not found and _bad(grad_input) and not _bad(grad_output):
                found.append(f"backward of module '{name}' ({type(mod).__name__}): finite output gradient "
                             f"became a non-finite input gradient")
        return hook

    def param_hook(pname):
        def hook(p):
            if not found and p.grad is not None and _bad(p.grad):
                found.append(f"gradient of parameter '{pname}'")
        return hook

    for name, mod in model.named_modules():
        if mod is model:
            continue
        handles.append(mod.register_forward_hook(fwd_hook(name)))
        handles.append(mod.register_full_backward_hook(bwd_hook(name)))
    for pname, p in model.named_parameters():
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(param_hook(pname)))
    model.zero_grad(set_to_none=True)
    try:
        loss = run_step()
        if not found and _bad(loss):
            found.append("the loss computation (every module's forward output was finite)")
        if not found and loss.requires_grad:
            with warnings.catch_warnings():  # modules fed integer ids have no input gradient: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return found[0] if found else "nowhere on re-run (the non-finite value did not reproduce)"


def raise_nonfinite(model: nn.Module, run_step: Callable[[], torch.Tensor], step: int, what: str,
                    last_checkpoint: str | None) -> None:
    """Locate and raise NonFiniteError for optimizer step `step` (1-based)."""
    where = locate_nonfinite(model, run_step)
    ckpt = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    raise NonFiniteError(f"step {step}: {what} is not finite; first non-finite value: {where}. "
                         f"Nothing was saved after it; {ckpt}.")
