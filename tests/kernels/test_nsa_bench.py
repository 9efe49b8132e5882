"""The NSA kernel bench's CPU-side pieces: inputs, tables, plot, and the optional fla import."""
import torch

from deepwish.bench import nsa_kernels as nb


def test_inputs_tables_and_plot(tmp_path):
    x = nb.make_inputs(64, "cpu", dtype=torch.float32, S=100)
    assert x["q"].shape == (1, 64, nb.H, nb.D) and x["k"].shape == (1, 100, nb.HKV, nb.D)
    assert x["cmp_end"][0, :3].tolist() == [31, 47, 63] and x["k_cmp"].shape[1] == x["cmp_end"].shape[1] == 5
    assert x["q_pos"][0, 0] == 36
    nb.QUERY_RUN = 8   # runs of 8 positions share a direction: neighbours far closer than strangers
    try:
        q = nb.make_inputs(64, "cpu", dtype=torch.float32)["q"][0, :, 0]
    finally:
        nb.QUERY_RUN = 0
    cos = torch.nn.functional.cosine_similarity
    assert cos(q[0], q[1], 0) > 0.8 and abs(cos(q[0], q[8], 0)) < 0.5
    cell = dict(fwd=1.0, bwd=2.0, fwdbwd=3.0)
    train = [dict(T=8192, cmp=cell, slc=cell, **{"nsa (cmp+slc)": dict(fwd=2.0, bwd=4.0, fwdbwd=6.0)},
                  sdpa=dict(fwd=4.0, bwd=8.0, fwdbwd=12.0), **{"fla cmp+slc": {"error": "fla not importable"}})]
    text = nb.train_table(train)
    assert "| 8192 | fwdbwd ms | 3.00 | 3.00 | 6.00 | 12.00 | error | - | 2.0x |" in text
    assert "fla not importable" in text
    kernels = dict(sum_ms=0.04, kernels=[dict(name="_slc_fwd_kernel", us_per_step=12.5, calls_per_step=1.0)])
    decode = [dict(C=8192, **{"cmp+slc": 0.05, "cmp": 0.03, "slc": "error: x", "win": 0.01, "nsa": 0.0625,
                              "sdpa": 0.1, "kernels": kernels, "variants": {"slc unsplit": 0.06}})]
    text = nb.decode_table(decode)
    assert "| 8192 | 50.0 | 30.0 | error: x | 10.0 | 62.5 | 100.0 | 2.00x | 1.60x |" in text
    assert "context 8192: cmp+slc us under slc unsplit 60.0" in text
    assert "context 8192: kernels 40.0 us a step" in text and "12.5 us  x1  _slc_fwd_kernel" in text
    nb.plot(train, decode, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_fla_missing_is_a_reason_not_an_error():
    got = nb.fla_nsa()
    assert callable(got) or "fla not importable" in got


def test_branch_times_runs_every_path(monkeypatch):
    """branch_times end to end at a toy shape under the interpreter, with a stand-in clock: our
    branches time, a missing fla is reported as such, nothing raises."""
    for name, value in dict(H=4, HKV=1, D=16, CMP_LEN=4, CMP_STRIDE=2, SELECT_LEN=8, N_SELECT=3).items():
        monkeypatch.setattr(nb, name, value)
    monkeypatch.setattr(nb, "time_ms", lambda fn, **kw: (fn(), 1.0)[1])
    row = nb.branch_times(20, torch.device("cpu"), dtype=torch.float32)   # no bf16 in the interpreter
    assert all(row[c].pop("seconds") >= 0 for c in ("cmp", "slc", "sdpa"))
    assert row["cmp"] == row["slc"] == dict(fwd=1.0, bwd=0.0, fwdbwd=1.0)
    assert row["nsa (cmp+slc)"]["fwdbwd"] == 2.0 and "sdpa" in row
    if isinstance(nb.fla_nsa(), str):
        assert "fla not importable" in row["fla slc"]["error"]


def test_sweep_checks_times_and_keeps_the_fastest(monkeypatch):
    """The tile sweep at a toy shape under the interpreter, a stand-in clock that makes each later
    candidate faster and a stand-in check that finds one candidate wrong: correct candidates are
    timed (the real kernels run under each override) and the fastest kept and applied; a wrong
    one and one that names no option are errors, not winners."""
    from deepwish.kernels.nsa import triton as nk
    for name, value in dict(H=4, HKV=1, D=16, CMP_LEN=4, CMP_STRIDE=2, SELECT_LEN=8, N_SELECT=3).items():
        monkeypatch.setattr(nb, name, value)
    for kind in ("cmp_fwd", "slc_fwd"):
        monkeypatch.setitem(nk.INTERPRET_TILES, kind, dict(nk.INTERPRET_TILES[kind]))   # restored afterwards
    clock = iter(range(100, 0, -1))
    monkeypatch.setattr(nb, "time_ms", lambda fn, **kw: (fn(), float(next(clock)))[1])

    def check(device, dtype, T):   # "wrong" under the insertion form, right otherwise
        wrong = nk.INTERPRET_TILES["cmp_fwd"]["SORT_MERGE"] is False
        return dict(o_cmp=0.5 if wrong else 1e-3, selection_equal=1.0)
    monkeypatch.setattr(nb, "check", check)
    cands = {"cmp_fwd": [{}, dict(FUSED_SELECT=True), dict(SORT_MERGE=False)], "slc_fwd": [{}, dict(BOGUS=1)]}
    got = nb.sweep(torch.device("cpu"), 20, candidates=cands, log=lambda m: None)
    assert got["cmp_fwd"]["best"] == dict(FUSED_SELECT=True) and nk.INTERPRET_TILES["cmp_fwd"]["FUSED_SELECT"] is True
    assert "wrong" in got["cmp_fwd"]["trials"][2]["error"]
    assert got["slc_fwd"]["best"] == {} and "BOGUS" in got["slc_fwd"]["trials"][1]["error"]


def test_shape_option_sets_the_inputs_and_refuses_bad_sizes(monkeypatch):
    for name in ("B", "H", "HKV"):
        monkeypatch.setattr(nb, name, getattr(nb, name))   # restored afterwards
    nb.set_shape("2,16,8")
    x = nb.make_inputs(40, "cpu", dtype=torch.float32)
    assert x["q"].shape == (2, 40, 16, nb.D) and x["k"].shape == (2, 40, 8, nb.D)
    for bad in ("8,16,3", "8,16", "0,4,4", "a,b,c"):
        try:
            nb.set_shape(bad)
        except ValueError as e:
            assert "--shape" in str(e)
        else:
            raise AssertionError(f"--shape {bad} accepted")


def test_decode_variants_name_real_launch_options():
    """Every decoding variant the bench times changes options its kernel kinds have (override_tiles
    refuses any other), so the GPU run times them instead of failing the part."""
    import contextlib

    from deepwish.kernels.nsa import triton as nk
    for name, change in nb.DECODE_VARIANTS.items():
        with contextlib.ExitStack() as stack:
            for kind, cfg in change.items():
                stack.enter_context(nk.override_tiles(kind, **cfg))
                assert all(nk.tile_config(kind, torch.bfloat16, 16)[o] == x for o, x in cfg.items()), name
