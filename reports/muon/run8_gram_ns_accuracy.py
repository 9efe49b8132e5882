import torch
from deepwish.kernels.muon import reference as ref, triton as tri
from deepwish.train.muon import newton_schulz, ns_coefficients
torch.manual_seed(0)
coeffs, f = ns_coefficients("jordan", 5)
def exact(G):
    E = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    for a, b, c in coeffs:
        A = E @ E.mT
        E = a * E + (b * A + c * A @ A) @ E
    return E
def err(x, E):
    return float((x.double() - E).norm() / E.norm())
def lowrank(n, m, k, decades):
    U, _ = torch.linalg.qr(torch.randn(k, n, m, device="cuda"))
    V, _ = torch.linalg.qr(torch.randn(k, m, m, device="cuda"))
    return (U * torch.logspace(-decades, 0, m, device="cuda")) @ V.mT
cases = {"randn 16x256x256": torch.randn(16, 256, 256, device="cuda"),
         "randn 8x512x1536": torch.randn(8, 512, 1536, device="cuda"),
         "randn 8x1536x512": torch.randn(8, 1536, 512, device="cuda"),
         "randn 4x1024x1024": torch.randn(4, 1024, 1024, device="cuda"),
         "randn 4x6144x1024": torch.randn(4, 6144, 1024, device="cuda"),
         "spread4 4x3072x1024": lowrank(3072, 1024, 4, 4).mT.contiguous(),
         "spread4 4x1024x1024": lowrank(1024, 1024, 4, 4)}
def sym_torch(P, alpha=1.0, beta=0.0, Y=None, other=None):
    return ref.gram(P, alpha=alpha, beta=beta, Y=Y, other=other)
for name, G in cases.items():
    G = G.bfloat16()
    E = exact(G)
    plain = err(newton_schulz(G, backend="torch"), E)
    row = {"torch plain": plain}
    for k in ("all", "gram_ns"):
        row[k] = err(tri.newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, kernels=k), E)
    row["ref gram_ns (fp32 products)"] = err(ref.gram_newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16), E)
    row["ref gram_ns, no restart"] = err(ref.gram_newton_schulz(G, coeffs, f, 1e-7, torch.bfloat16, restart=99), E)
    print(f"{name:22s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
