"""One FLOP count and one peak table behind the trainer's MFU and `deepwish bench train`."""
import dataclasses
import json

import pytest
import torch

from deepwish.config import load_config
from deepwish.model import Transformer
from deepwish.train import mfu as M


def test_mean_keys_counts_the_causal_and_windowed_masks():
    for T, w in ((64, 0), (64, 16), (64, 64), (64, 100), (37, 5)):
        i = torch.arange(T)
        mask = (i[None, :] <= i[:, None])
        if w:
            mask &= i[:, None] - i[None, :] < w
        exact = mask.sum().item() / T
        # the convention drops the diagonal's half (T/2, not (T+1)/2): within one key per query
        assert abs(M.mean_keys(T, w) - exact) <= 0.5 + 1e-9, (T, w, M.mean_keys(T, w), exact)
    assert M.mean_keys(2048) == 1024 and M.mean_keys(2048, 4096) == 1024
    assert M.mean_keys(8192, 1024) == 1024 - 1024 ** 2 / (2 * 8192)


def test_gated_delta_count_is_the_kernel_benchmarks_count():
    from deepwish.bench import gdn
    T = 4096
    per_token_fwd = gdn.gdn_fwd_flops(T, heads=16, K=128, V=128) / (gdn.B * T)
    assert M.gated_delta_flops_per_token(16, 128, 128) == pytest.approx(3 * per_token_fwd)


def test_peak_table_names_its_source():
    flops, copy, note = M.peaks_for_name("NVIDIA H200")
    assert (flops, copy) == (774e12, 4172e9) and "measured" in note and "774" in note
    assert M.peaks_for_name("NVIDIA H100 80GB HBM3")[0] == 777e12
    assert M.peaks_for_name("NVIDIA GH200 480GB")[1] is None  # GH200 is not taken for an H200
    assert M.peaks_for_name("Some GPU")[0] is None
    assert M.device_peak_flops(torch.device("cpu"))[0] is None
    assert M.mfu(1000.0, 2e9, 4e12) == 0.5 and M.mfu(1000.0, 2e9, None) is None


@pytest.mark.parametrize("preset", ["qwen3_tiny", "qwen3_next_tiny"])
def test_trainer_and_bench_count_the_same_flops_and_mfu(preset, monkeypatch, tmp_path):
    """The progress line's MFU (Logger, given model.flops_per_token as the loop passes it) equals the
    benchmark's (model_flops_per_token from a meta model, the same peak) for a made-up tok/s."""
    from deepwish.bench import train as bench
    from deepwish.train import log as L

    cfg = load_config(preset).model
    seq = 256
    model = Transformer(cfg)
    fpt_loop = model.flops_per_token(seq)
    assert bench.model_flops_per_token(cfg, seq) == fpt_loop
    kinds = {b.mixer_kind for b in model.blocks}
    mixer = fpt_loop - 6.0 * (model.num_params(active=True) - (model.embed.weight.numel() if model.lm_head else 0))
    expect = 0.0
    for b in model.blocks:
        if b.mixer_kind == "gdn":
            expect += M.gated_delta_flops_per_token(cfg.linear_n_v_heads, cfg.linear_k_head_dim, cfg.linear_v_head_dim)
        else:
            expect += 6 * cfg.n_heads * cfg.head_dim * seq / 2 * 2
    assert mixer == pytest.approx(expect), kinds
    if preset == "qwen3_next_tiny":
        assert "gdn" in kinds  # the recurrence is part of the count
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    peak, note = M.device_peak_flops(torch.device("cuda"))
    logger = L.Logger(tmp_path, total_steps=10, flops_per_token=fpt_loop, device=torch.device("cuda"), log_every=1,
                      progress_bar=False)
    assert logger.peak_flops == peak == 774e12 and logger.peak_note == note
    assert M.mfu(50_000.0, bench.model_flops_per_token(cfg, seq), peak) == \
        M.mfu(50_000.0, logger.flops_per_token, logger.peak_flops)


def test_hf_liger_variant_is_skipped_with_its_reason():
    from deepwish.bench import train as bench
    try:
        import liger_kernel  # noqa: F401
        have = True
    except Exception:  # noqa: BLE001
        have = False
    if not have:
        with pytest.raises(bench.Skipped, match="liger_kernel is not importable"):
            bench.apply_liger("qwen3")
    else:
        with pytest.raises(bench.Skipped, match="no Liger patch wired for HF model type 'gpt2'"):
            bench.apply_liger("gpt2")
    assert bench.VARIANTS.index("hf") < bench.VARIANTS.index("hf-liger")  # Liger patches HF's classes for good


def test_bench_train_verdicts_name_the_anchors_goals():
    """bench train's goal lines: deepwish (random ids, AdamW) against HF + Liger (>= 2x) and
    torchtitan (>= 1.2x) measured in the same run, and Muon against AdamW (>= 90%)."""
    from deepwish.bench import train as bench
    R = bench.Result
    rows = [R("qwen3_0.6b", "hf-liger", 8, 2048, "ok", tok_s=50e3, mfu=0.3),
            R("qwen3_0.6b", "torchtitan", 8, 2048, "ok", tok_s=90e3, mfu=0.5),
            R("qwen3_0.6b", "deepwish", 8, 2048, "ok", tok_s=100e3, mfu=0.55),
            R("qwen3_0.6b", "deepwish-packed", 8, 2048, "ok", tok_s=120e3, mfu=0.6),
            R("qwen3_0.6b", "deepwish-muon", 8, 2048, "ok", tok_s=91e3, mfu=0.5)]
    text = "\n".join(bench.verdicts("qwen3_0.6b", rows))
    assert "deepwish vs HF + Liger measured here (b8): 2.00x (goal >= 2x: MET)" in text
    assert "deepwish vs torchtitan measured here (b8): 1.11x (goal >= 1.2x: NOT met)" in text
    assert "deepwish-muon / deepwish (AdamW): 91.0% of its tok/s (goal >= 90%: MET)" in text


def test_bench_train_torchtitan_without_the_library_is_skipped_with_a_reason(monkeypatch):
    import builtins

    from deepwish.bench import train as bench
    real_import = builtins.__import__

    def no_titan(name, *a, **k):
        if name.startswith("torchtitan"):
            raise ModuleNotFoundError("No module named 'torchtitan'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_titan)
    with pytest.raises(bench.Skipped, match="torchtitan is not importable"):
        bench.build_torchtitan("qwen3_0.6b", 1, 8)


def test_modules_torchtitan_imports_but_the_bench_never_uses_stand_in_only_while_absent_and_only_within():
    """torchtitan 0.2 imports its data and logging components (datasets, torch.utils.tensorboard)
    when its model package loads; where they are absent, inert stand-ins let the model import, and
    anything taken from them refuses to run, naming itself."""
    import json
    import sys

    from deepwish.bench import train as bench
    with bench.stand_ins_for_absent(("deepwish_absent_module", "json")) as added:
        assert added == ["deepwish_absent_module"]  # json imports: the real module stays
        assert sys.modules["json"] is json
        from deepwish_absent_module import Dataset  # noqa: F401 - what an importing module does
        with pytest.raises(RuntimeError, match="deepwish_absent_module.Dataset: a stand-in"):
            Dataset()
    assert "deepwish_absent_module" not in sys.modules
    with pytest.raises(ImportError):
        import deepwish_absent_module  # noqa: F401


def test_bench_train_suffixed_variants_and_their_verdicts():
    """NAME+bf16 is that deepwish variant with train.residual_dtype=bf16, NAME+cd with inductor's
    coordinate-descent tuning; anchors take no suffix;
    the +bf16 row is set against the anchors beside the plain one."""
    from deepwish.bench import train as bench
    assert bench.variant_parts("deepwish-muon+bf16") == ("deepwish-muon", ("bf16",))
    assert bench.variant_parts("deepwish+bf16+cd") == ("deepwish", ("bf16", "cd"))
    assert bench.variant_parts("deepwish") == ("deepwish", ())
    for bad in ("hf+bf16", "torchtitan+bf16", "torchtitan+cd", "deepwish+fp16", "deepwish-nope", "deepwish+cd+cd"):
        with pytest.raises(ValueError):
            bench.variant_parts(bad)
    plain = bench._run_config("qwen3_tiny", 2, 64, "deepwish-muon").train
    bf16 = bench._run_config("qwen3_tiny", 2, 64, "deepwish-muon+bf16").train
    assert (plain.residual_dtype, bf16.residual_dtype) == ("fp32", "bf16")
    assert bf16.optimizer == "muon" and bf16 == dataclasses.replace(plain, residual_dtype="bf16")
    both = bench._run_config("qwen3_tiny", 2, 64, "deepwish-muon+bf16+cd").train
    assert both == dataclasses.replace(bf16, compile_mode="coordinate-descent")
    R = bench.Result
    rows = [R("qwen3_0.6b", "hf-liger", 8, 2048, "ok", tok_s=50e3, mfu=0.3),
            R("qwen3_0.6b", "deepwish", 8, 2048, "ok", tok_s=90e3, mfu=0.5),
            R("qwen3_0.6b", "deepwish+bf16", 8, 2048, "ok", tok_s=100e3, mfu=0.55),
            R("qwen3_0.6b", "deepwish-muon+cd", 8, 2048, "ok", tok_s=95e3, mfu=0.52)]
    text = "\n".join(bench.verdicts("qwen3_0.6b", rows))
    assert "deepwish vs HF + Liger measured here (b8): 1.80x (goal >= 2x: NOT met)" in text
    assert "deepwish+bf16 vs HF + Liger measured here (b8): 2.00x (goal >= 2x: MET)" in text
    assert "deepwish-muon+cd vs" not in text  # Muon is not the anchors' optimizer


def test_bench_packed_variant_reads_a_built_corpus_and_counts_documents_per_row(tmp_path, capsys):
    """deepwish-packed's batches from --packed-data: short documents pack several per row (the
    embedded corpus's plays give ~1, the plain causal path), reported as documents per row; a
    corpus whose ids overflow the model's embedding table, or a directory without train.bin, is
    refused with a line naming the problem."""
    from deepwish.bench import train as bench
    from deepwish.data.shards import write_shard

    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 90, (int(n),), generator=rng).tolist() for n in torch.randint(3, 12, (60,), generator=rng)]
    write_shard(tmp_path / "train.bin", docs, vocab_size=100, fingerprint="test")
    batches, per_row = bench.packed_batches(2, 32, torch.device("cpu"), count=3, data=str(tmp_path), vocab_size=128)
    assert len(batches) == 3 and batches[0][0].shape == (2, 32)
    assert per_row > 2  # 32-token rows of 3-11-token documents
    ids = batches[0][2]
    assert ids is not None and len(torch.unique(ids[0])) > 1
    with pytest.raises(ValueError, match="larger than the model's"):
        bench.packed_batches(2, 32, torch.device("cpu"), count=1, data=str(tmp_path), vocab_size=64)
    with pytest.raises(SystemExit, match="no train.bin"):
        bench.main(["--packed-data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("variant", ["deepwish-eager", "deepwish-packed"])
def test_bench_train_step_builder_runs_and_reports_its_flops_and_info(variant, tmp_path):
    """build_deepwish hands back what measure() and profile_train unpack: a step that trains (the
    loss is finite and falls on one repeated batch), the model's FLOPs per token, and info, which
    for the packed variant holds documents per row of the corpus it read."""
    from deepwish.bench import train as bench
    from deepwish.data.shards import write_shard

    rng = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 90, (int(n),), generator=rng).tolist() for n in torch.randint(3, 12, (60,), generator=rng)]
    write_shard(tmp_path / "train.bin", docs, vocab_size=100, fingerprint="test")
    step, fpt, info = bench.build_deepwish("qwen3_tiny", 2, 32, variant, packed_data=str(tmp_path))
    assert fpt == bench.model_flops_per_token(load_config("qwen3_tiny").model, 32)
    losses = [float(step()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    if variant == "deepwish-packed":
        assert info["docs_per_row"] > 2
    else:
        assert info == {} and losses[-1] < losses[0]  # one random batch, repeated: AdamW fits it


def test_profile_train_profiles_the_step_bench_train_times_for_every_variant(monkeypatch, capsys, tmp_path):
    """`bench profile_train --variant V` builds the same step as `bench train` for V: the anchors
    (HF, HF + Liger, torchtitan) through their builders, deepwish's variants through build_deepwish
    (run for real here on the tiny preset: a step that trains)."""
    from deepwish.bench import profile_train
    from deepwish.bench import train as bench
    from deepwish.train.profile import trace_figures

    step = profile_train.build_step("qwen3_tiny", 2, 32, "deepwish-eager")
    assert torch.isfinite(step())
    monkeypatch.setattr(bench, "build_hf", lambda preset, b, s, liger=False: (lambda: ("hf", preset, b, s, liger), 1.0))
    monkeypatch.setattr(bench, "build_torchtitan", lambda preset, b, s: (lambda: ("torchtitan", preset, b, s), 1.0))
    monkeypatch.setattr(bench, "build_deepwish",
                        lambda preset, b, s, v, packed_data=None: (lambda: ("deepwish", preset, b, s, v), 1.0, {}))
    assert profile_train.build_step("qwen3_0.6b", 8, 2048, "hf")() == ("hf", "qwen3_0.6b", 8, 2048, False)
    assert profile_train.build_step("qwen3_0.6b", 8, 2048, "hf-liger")() == ("hf", "qwen3_0.6b", 8, 2048, True)
    titan = profile_train.build_step("qwen3_0.6b", 4, 1024, "torchtitan")
    assert titan() == ("torchtitan", "qwen3_0.6b", 4, 1024)
    assert profile_train.build_step("qwen3_0.6b", 8, 2048, "deepwish-muon")() == (
        "deepwish", "qwen3_0.6b", 8, 2048, "deepwish-muon")
    # an anchor's step marks none of our phases: it runs as one, so the idle-time summary has a window
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        titan()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    assert "step" in trace_figures(json.loads(trace.read_text()))["host_us"]
    # a misspelt name is refused with the known ones, before anything is built
    with pytest.raises(ValueError, match="unknown variant 'hf-ligr'; known: hf, hf-liger, torchtitan"):
        profile_train.build_step("qwen3_0.6b", 8, 2048, "hf-ligr")
    with pytest.raises(SystemExit):
        profile_train.main(["--variant", "torchtitn"])
    assert "unknown variant 'torchtitn'" in capsys.readouterr().err
