"""Newton–Schulz, Muon and the optimizer parameter groups."""
import pytest
import torch
from torch import nn

from deepwish.config import TrainConfig
from deepwish.train.optim import Muon, build_optimizer, classify_params, newton_schulz, param_groups


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (3, 40, 100), (2, 100, 40)])
def test_newton_schulz_singular_values_and_direction(shape):
    G = torch.randn(*shape)
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # Close to the exact polar factor U V^T (same singular vectors, spectrum near 1).
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    cos = (X.double() * polar).sum(dim=(-2, -1)) / (X.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos


def test_newton_schulz_batched_equals_per_matrix():
    G = torch.randn(4, 24, 56)
    X = newton_schulz(G)
    for e in range(4):
        torch.testing.assert_close(X[e], newton_schulz(G[e]), rtol=1e-5, atol=1e-5)


def test_newton_schulz_keeps_low_precision_dtype_and_rejects_vectors():
    X = newton_schulz(torch.randn(16, 64, dtype=torch.bfloat16))
    assert X.dtype == torch.bfloat16 and X.shape == (16, 64)
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(8))


@pytest.mark.gpu
def test_newton_schulz_bf16_on_gpu(cuda):
    G = torch.randn(8, 512, 1536, device=cuda)
    s = torch.linalg.svdvals(newton_schulz(G).double())
    assert s.min() > 0.6 and s.max() < 1.3


def test_muon_step_matches_formula():
    p = nn.Parameter(torch.randn(40, 20))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.5)
    g1, g2 = torch.randn(40, 20), torch.randn(40, 20)
    p.grad = g1.clone()
    opt.step()
    m = g1
    exp = p0 * (1 - 0.1 * 0.5) - 0.1 * 2 ** 0.5 * newton_schulz(g1 + 0.9 * m)
    torch.testing.assert_close(p.detach(), exp)
    p.grad = g2.clone()
    opt.step()
    m = 0.9 * m + g2
    exp = exp * (1 - 0.1 * 0.5) - 0.1 * 2 ** 0.5 * newton_schulz(g2 + 0.9 * m)
    torch.testing.assert_close(p.detach(), exp)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.randn(5))])


class ToyMoE(nn.Module):
    """Every kind of parameter the real models have, each with its role (model/roles.py)."""

    PARAM_ROLES = {"mlp.gate.weight": "gate", "mlp.shared_expert_gate.weight": "gate", "experts_w1": "expert",
                   "A_log": "scalar", "frozen": "matrix", "lm_head.weight": "head", "attn.o_proj.weight": "matrix_out"}

    def __init__(self, tie=False):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = nn.ModuleDict(dict(q_proj=nn.Linear(16, 16, bias=True), o_proj=nn.Linear(16, 16, bias=False)))
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.ModuleDict(dict(gate=nn.Linear(16, 4, bias=False), gate_proj=nn.Linear(16, 32, bias=False),
                                      shared_expert_gate=nn.Linear(16, 1, bias=False)))
        self.experts_w1 = nn.Parameter(torch.randn(4, 32, 16))
        self.conv1d = nn.Conv1d(16, 16, 4, groups=16, bias=False)
        self.A_log = nn.Parameter(torch.zeros(4))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.lm_head = nn.Linear(16, 50, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    @property
    def head_weight(self):
        return self.lm_head.weight


def test_param_groups_cover_every_parameter_once():
    groups, names = classify_params(ToyMoE())
    assert sorted(names.muon) == sorted(["attn.q_proj.weight", "attn.o_proj.weight", "mlp.gate_proj.weight",
                                         "experts_w1"])
    assert sorted(names.adamw_decay) == ["embed.weight", "lm_head.weight"]
    assert sorted(names.adamw_no_decay) == sorted(["attn.q_proj.bias", "norm.weight", "norm.bias", "mlp.gate.weight",
                                                   "mlp.shared_expert_gate.weight", "conv1d.weight", "A_log"])


def test_param_groups_tied_head_counted_once():
    model = ToyMoE(tie=True)
    groups, names = classify_params(model)
    assert names.adamw_decay == ["embed.weight"]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_build_optimizer_muon_and_adamw_train_every_parameter():
    for name in ("muon", "adamw"):
        model = ToyMoE()
        cfg = TrainConfig(optimizer=name, weight_decay=0.1)
        opt = build_optimizer(model, cfg)
        assert set(opt.optimizers) == ({"muon", "adamw"} if name == "muon" else {"adamw"})
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        opt.step()
        for n, p in model.named_parameters():
            assert torch.equal(before[n], p.detach()) != p.requires_grad, n
        state = opt.state_dict()
        opt.load_state_dict(state)
        assert all("base_lr" in g for g in opt.param_groups)
    with pytest.raises(ValueError, match="optimizer"):
        param_groups(ToyMoE(), TrainConfig(optimizer="sgd"))


def test_overlap_is_sequential_off_cuda_and_with_one_optimizer():
    """train.optimizer_overlap needs CUDA and two optimizers; elsewhere the step is the plain
    sequential one (the same parameters bit for bit). The overlapped step itself: tests/train/test_gpu_train.py."""
    torch.manual_seed(0)
    a, b = ToyMoE(), ToyMoE()
    b.load_state_dict(a.state_dict())
    oa = build_optimizer(a, TrainConfig(optimizer="muon"))
    ob = build_optimizer(b, TrainConfig(optimizer="muon", optimizer_overlap=True))
    assert ob.overlap and ob._overlap_device() is None
    assert build_optimizer(ToyMoE(), TrainConfig(optimizer="adamw", optimizer_overlap=True))._overlap_device() is None
    for m, o in ((a, oa), (b, ob)):
        torch.manual_seed(1)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        o.step()
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n


def test_real_model_groups_keep_conv_router_and_gates_off_muon():
    from deepwish.config import model_config
    from deepwish.model import Transformer
    for preset in ("qwen3_next_tiny", "deepseek_v32_tiny"):
        model = Transformer(model_config(preset, n_layers=2, d_model=64))
        _, names = classify_params(model)
        for n in names.muon:
            leaf = n.split(".")[-2] if n.count(".") else n
            assert "conv" not in n and "router" not in n and leaf not in ("shared_gate", "weights_proj"), n
        assert any(n.endswith("w_gate_up") for n in names.muon)  # stacked experts are on Muon
        assert {"embed.weight", "lm_head.weight"} <= set(names.adamw_decay)


def test_a_parameter_without_a_role_is_an_error_naming_it():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.mystery = nn.Parameter(torch.zeros(3))

    with pytest.raises(ValueError, match="mystery: no role"):
        classify_params(Bare())


def test_groups_follow_roles_not_names():
    """Renaming a parameter cannot move it to another optimizer: a router named like a hidden
    matrix stays a gate, a hidden matrix named like a router stays on Muon."""
    class Renamed(nn.Module):
        PARAM_ROLES = {"w_down_like_router.weight": "gate"}

        def __init__(self):
            super().__init__()
            self.w_down_like_router = nn.Linear(8, 4, bias=False)
            self.router = nn.Linear(8, 8, bias=False)  # an nn.Linear: a hidden matrix by default

    _, names = classify_params(Renamed())
    assert names.muon == ["router.weight"] and names.adamw_no_decay == ["w_down_like_router.weight"]


@pytest.mark.parametrize("max_norm", [0.05, 1e6])   # clipping active / a no-op
def test_clip_folded_into_the_update_equals_clipping_in_place(max_norm):
    """clip_grad_norm hands its coefficient to a fused AdamW (torch's grad_scale) and to Muon (its
    momentum pass) instead of scaling every gradient first: three steps give the same parameters as
    clipping in place; AdamW leaves the same gradients, Muon the unscaled ones; the coefficient
    serves one step."""
    from deepwish.train.optim import ChainedOptimizer
    from deepwish.train.parallel import clip_grad_norm
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 8, generator=gen) for _ in range(3)]
    runs = {}
    for folded in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16, bias=False))
        opt = ChainedOptimizer({
            "muon": Muon([m[1].weight], lr=0.02, momentum=0.95, ns_steps=5, backend="torch"),
            "adamw": torch.optim.AdamW(list(m[0].parameters()), lr=1e-2, fused=True)})
        grads = []
        for x in xs:
            (m(x).pow(2).sum() * 10).backward()
            raw = m[1].weight.grad.clone()
            norm = clip_grad_norm(m.parameters(), max_norm, opt if folded else None)
            assert (norm > max_norm) == (max_norm < 1)   # the small max_norm clips every step
            if folded:
                assert all(o.grad_scale.shape == () for o in opt.optimizers.values())
            opt.step()
            assert not any(hasattr(o, "grad_scale") for o in opt.optimizers.values())
            if folded:
                torch.testing.assert_close(m[1].weight.grad, raw, rtol=0, atol=0)  # Muon read it scaled
            grads.append([p.grad.clone() for p in m[0].parameters()])
            opt.zero_grad()
        runs[folded] = ([p.detach().clone() for p in m.parameters()], grads)
    for a, b in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for ga, gb in zip(runs[False][1], runs[True][1]):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_which_optimizers_take_the_clip_coefficient():
    from deepwish.train.optim import ChainedOptimizer
    lin, mat = nn.Linear(4, 4), nn.Parameter(torch.randn(4, 4))
    plain = ChainedOptimizer({"adamw": torch.optim.AdamW(lin.parameters(), foreach=True)})
    assert plain.take_grad_scale(torch.tensor(0.5)) == set()   # the caller scales these
    both = ChainedOptimizer({"muon": Muon([mat], backend="torch"),
                             "adamw": torch.optim.AdamW(lin.parameters(), fused=True)})
    assert both.take_grad_scale(torch.tensor(0.5)) == {id(p) for p in [mat, *lin.parameters()]}
    assert both.optimizers["adamw"].grad_scale.item() == both.optimizers["muon"].grad_scale.item() == 2.0
