"""The command line end to end on a tiny run: train -> generate (plain, draft) -> convert -> HF
load -> plot, and one-line errors for bad input."""
import re

import pytest
import torch

from deepwish.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "qwen3_tiny", "--out", str(d), "--set", "model.n_layers=1",
                 "--set", "train.steps=6", "--set", "train.eval_every=3", "--set", "train.save_every=3",
                 "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.sample_tokens=4"]) == 0
    return d


def test_generate_plain_and_speculative_agree_greedy(run_dir, capsys):
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    first = capsys.readouterr()
    plain = first.out
    n = re.search(r"\[deepwish\] generate: (\d+) tokens(; first after [\d.]+ s \(prefill of \d+ prompt tokens\), "
                  r"then [\d,.]+ tok/s| in [\d.]+ s); set-up [\d.]+ s \(load\)", first.err)
    assert n and 1 <= int(n.group(1)) <= 8, first.err  # the timing line, on stderr only
    assert main(["generate", "--ckpt", str(run_dir), "--draft", str(run_dir), "--prompt", "KING:",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and plain.startswith("KING:")
    assert "acceptance 100.0%" in captured.err


def test_generate_with_beams_prints_the_best_beam(run_dir, capsys):
    from deepwish.generate import beam_search
    from deepwish.weights import load_model
    from deepwish.data.tokenizer import load_tokenizer

    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "8",
                 "--temperature", "0", "--num-beams", "3", "--length-penalty", "0.5"]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(run_dir / "tokenizer")
    best = beam_search(load_model(run_dir), tok.encode("KING:"), 8, 3, length_penalty=0.5, stop_tokens=[tok.eos_id])
    assert out == "KING:" + tok.decode(best[0][0]) + "\n"


def test_convert_then_generate_from_hf_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(run_dir), str(out), "--dtype", "fp32"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "--hf", str(out), "--prompt", "KING:", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == a


def test_generate_takes_runtime_model_settings(run_dir, tmp_path, capsys):
    """`generate --set model.KEY=VALUE` for the fields that choose how the weights are computed
    (decode options, backends), from a run and from an HF directory; a field the weights fix is a
    one-line error naming what may be set."""
    from deepwish.weights import load_model
    sets = ["--set", "model.fuse_projections=false", "--set", "model.attn_backend=torch"]
    model = load_model(run_dir, overrides=sets[1::2])
    assert not model.cfg.fuse_projections and model.cfg.attn_backend == "torch"
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "6",
                 "--temperature", "0", *sets]) == 0
    assert capsys.readouterr().out == plain
    hf = tmp_path / "hf"
    assert main(["convert", str(run_dir), str(hf), "--dtype", "fp32"]) == 0
    assert not load_model(hf, overrides=["model.decode_prologue=false"]).cfg.decode_prologue
    capsys.readouterr()
    for src in (["--ckpt", str(run_dir)], ["--hf", str(hf)]):
        assert main(["generate", *src, "--prompt", "x", "--set", "model.d_model=64"]) == 2
        err = capsys.readouterr().err
        assert "model.d_model=64" in err and "decode_fusion" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "x", "--set", "model.decode_fusion=maybe"]) == 2
    assert "decode_fusion='maybe' is not a valid bool" in capsys.readouterr().err


def test_plot(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    assert list(run_dir.glob("*.png"))


def test_errors_are_one_line(run_dir, capsys):
    assert main(["train", "--preset", "qwen3_tiny", "--set", "model.n_layer=3"]) == 2
    assert "unknown key 'n_layer'" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "x", "--max-new-tokens", "5000"]) == 2
    assert "cache" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run_dir), "--mtp", "--prompt", "x"]) == 2
    assert "multi-token-prediction" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3 must be >= 1"),
    (["--temperature", "-0.5"], "--temperature -0.5 must be >= 0"),
    (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--dtype", "fp16"], "--dtype 'fp16' is not one of auto, bf16, fp32"),
    (["--num-beams", "3"], "--num-beams 3 needs --temperature 0"),
    (["--num-beams", "0"], "--num-beams 0 must be >= 1"),
    (["--compile", "--graph", "off"], "--compile compiles the captured decode step: it needs --graph"),
    (["--compile"], "it needs --graph (on CUDA), and this run is on cpu"),
])
def test_nonsense_generation_arguments_are_one_line_errors(run_dir, capsys, argv, match):
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_data_build_input_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    for inp, match in ((tmp_path / "d", "is a directory"), (tmp_path / "latin1.txt", "latin1.txt: not UTF-8"),
                       (tmp_path / "bad.jsonl", "bad.jsonl:1: invalid JSON"),
                       (tmp_path / "missing.txt", "missing.txt does not exist")):
        assert main(["data", "build", "--input", str(inp), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1, err


def test_nonfinite_training_is_one_line(tmp_path, capsys):
    argv = ["train", "--preset", "qwen3_tiny", "--out", str(tmp_path / "r"), "--set", "model.n_layers=1",
            "--set", "train.steps=3", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
            "--set", "train.optimizer=adamw", "--set", "train.lr=1e30", "--set", "train.grad_clip=0",
            "--set", "train.warmup_steps=1", "--set", "train.schedule=constant", "--set", "train.sample_tokens=0"]
    assert main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # progress lines go to stderr before it
    assert last.startswith("error: step ") and "not finite" in last and "Traceback" not in last
