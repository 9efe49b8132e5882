"""The shipped decode step of whichever deepwish is first on PYTHONPATH, Qwen3-0.6B random init, context 512:
batch 1, 8 and 64 captured, batch 64 compiled and captured (reports/inference.md, "Measured 2026-12-06 (later)")."""
import dataclasses, sys, torch
import deepwish
from deepwish.bench.decode import _decode_rows, build
from deepwish.config import model_config
tag = sys.argv[1]
cfg = model_config("qwen3_0.6b")
cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, 512 + 64 + 1))
torch.manual_seed(0)
model = build(cfg, torch.device("cuda"))
print(tag, deepwish.__file__, flush=True)
for b, mode in ((1, "graph"), (8, "graph"), (64, "graph"), (64, "compiled"), (1, "graph")):
    (r,) = _decode_rows("qwen3_0.6b", model, b, 512, 64, [mode], torch.device("cuda"), label=f"{tag} {mode}")
