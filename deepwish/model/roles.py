"""Parameter roles: what each parameter *is*, declared by the module that owns it.

Optimizer groups, initialisation, weight decay, active-parameter counts and FLOP counts all read
a parameter's role, never its name: renaming an attribute cannot silently move a matrix to
another optimizer or give it another initialisation.

    role          what it is                                          optimizer      init
    matrix        hidden linear map                                   Muon           N(0, std)
    matrix_out    hidden linear map whose output is added to the      Muon           N(0, std/√(2L))
                  residual stream (o_proj, w_down, out_proj)
    expert        stacked routed-expert matrices [E, out, in]         Muon           N(0, std)
    expert_out    stacked routed-expert output projections            Muon           N(0, std/√(2L))
    embedding     token embedding (also the head when tied)           AdamW + decay  N(0, std)
    head          untied LM head                                      AdamW + decay  N(0, std)
    gate          router / gate rows: scores, not a hidden map        AdamW          N(0, std)
    norm          norm gains                                          AdamW          owner's reset_parameters
    bias          additive biases                                     AdamW          zeros
    conv          depthwise convolution kernels                       AdamW          owner's reset_parameters
    scalar        per-head scalars (decay rates, time-step biases)    AdamW          owner's reset_parameters

Declaring: `nn.Linear` weights default to `matrix` and their biases to `bias`, `nn.Embedding` to
`embedding`, norm weights to `norm` and their biases to `bias`, convolution modules to `conv`.
Anything else — and any default that is wrong for the module — is declared by the owner in a
class attribute `PARAM_ROLES = {"relative.parameter.name": role}`. A parameter with no role is an
error that names it (`param_roles(model)` is the one place that resolves them).
"""
from __future__ import annotations

from torch import nn

ROLES = ("matrix", "matrix_out", "expert", "expert_out", "embedding", "head", "gate", "norm", "bias", "conv",
         "scalar")
MUON_ROLES = frozenset({"matrix", "matrix_out", "expert", "expert_out"})  # hidden matrices (and stacks)
DECAY_ROLES = frozenset({"embedding", "head"})  # AdamW with weight decay
EXPERT_ROLES = frozenset({"expert", "expert_out"})  # only top-k of E are active per token
RESIDUAL_OUT_ROLES = frozenset({"matrix_out", "expert_out"})  # scaled initialisation
NORMAL_INIT_ROLES = frozenset({"matrix", "matrix_out", "expert", "expert_out", "embedding", "head", "gate"})
OWNER_INIT_ROLES = frozenset({"norm", "conv", "scalar"})  # the owner's reset_parameters knows its scheme


def _default_role(module: nn.Module, name: str) -> str | None:
    if isinstance(module, nn.Linear):
        return "matrix" if name == "weight" else "bias"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv" if name == "weight" else "bias"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm"):
        return "norm" if name == "weight" else "bias"
    return None


def param_roles(model: nn.Module) -> dict[str, str]:
    """{parameter name (as `named_parameters` gives it): role} for every parameter of `model`,
    tied parameters under their first name. Raises naming every parameter without a role, every
    declaration that names no parameter, and every unknown role."""
    roles: dict[str, str] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            role = _default_role(mod, pname)
            if role is not None:
                roles[f"{mname}.{pname}" if mname else pname] = role
    problems = []
    params = dict(model.named_parameters())
    every_name = {n for n, _ in model.named_parameters(remove_duplicate=False)}  # tied ones under each name
    for mname, mod in model.named_modules():  # declarations override defaults
        for rel, role in getattr(mod, "PARAM_ROLES", {}).items():
            full = f"{mname}.{rel}" if mname else rel
            if role not in ROLES:
                problems.append(f"{full}: unknown role {role!r} (roles: {', '.join(ROLES)})")
            elif full in params:
                roles[full] = role
            elif full in every_name:
                pass  # a tied parameter: its role is the one of its first name
            elif not _declared_optional(mod, rel):
                problems.append(f"{type(mod).__name__}.PARAM_ROLES names {rel!r}, which is not a parameter")
    missing = [n for n in params if n not in roles]
    problems += [f"{n}: no role (declare it in its module's PARAM_ROLES)" for n in missing]
    if problems:
        raise ValueError("parameter roles: " + "; ".join(problems))
    return {n: roles[n] for n in params}


def _declared_optional(module: nn.Module, rel: str) -> bool:
    """A declaration may name an optional sub-module left out by the config (e.g. a bias=False
    Linear's bias, or a shared-expert gate that this config does not build)."""
    obj = module
    for part in rel.split(".")[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return True
    return getattr(obj, rel.split(".")[-1], None) is None
