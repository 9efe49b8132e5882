"""The split-KV decode kernel's merge inside the split kernel (decode_attention(merge_in_split=True))
against its own merge kernel (as the model runs it since 2026-12-07), in the captured batch-1 step with
every decode option on, alternating in one process. On the GPU machine:

    PRESET=qwen3_0.6b CTX=512 OUT=DIR python3 reports/inference/merge_ab.py    # also CTX=4096; PRESET=qwen3_0.6b_nsa

(The 2026-12-07 run patched the other way round: the model then passed merge_in_split=True and the
wrapper forced False; the two forms timed are the same.)"""
import functools
import json
import os

from deepwish.bench import decode_profile
from deepwish.kernels.attention import decode

shipped = decode.decode_attention


@functools.wraps(shipped)
def in_split(*args, **kwargs):
    kwargs["merge_in_split"] = True
    return shipped(*args, **kwargs)


out = os.environ.get("OUT", "/tmp")
preset, ctx = os.environ.get("PRESET", "qwen3_0.6b_nsa"), int(os.environ.get("CTX", "4096"))
results = []
for i, form in enumerate(["in_split", "merge_kernel"] * 2):
    decode.decode_attention = in_split if form == "in_split" else shipped   # the model imports it per call
    doc = decode_profile.run(f"{out}/{preset}_{ctx}_ab_{i}_{form}", preset, 1, ctx, ("captured",), 32, 12,
                             matmul="triton", prologue=True, fusion=True, pdl=True)
    summary = {k: v for k, v in doc["paths"]["captured"].items() if not isinstance(v, (list, dict))}
    results.append({"form": form, **summary})
    print("AB", preset, ctx, form, summary, flush=True)
decode.decode_attention = shipped
with open(f"{out}/{preset}_{ctx}_ab.json", "w") as f:
    json.dump(results, f, indent=1)
