"""Loss-masked (SFT) shards under data parallelism: each rank's windows hold a different number of
assistant tokens, so the step's loss is right only if the count is all-reduced before dividing.
2 DDP ranks x 1 sequence x 2 micro-batches reproduce one process with batch 4, step by step."""
from deepwish.config import load_config
from deepwish.data.build import build_shards
from deepwish.data.loader import PackedLoader
from deepwish.data.tokenizer import default_tokenizer
from deepwish.train import loop
from deepwish.train.loss import count_targets
from tests.train.test_distributed import TINY, assert_same_losses, logged, torchrun, train_args


def test_masked_shards_on_two_ddp_ranks_match_one_process(tmp_path):
    data = build_shards(["examples/chat.jsonl"], tmp_path / "data", default_tokenizer(), val_fraction=0.15)
    paths = [f"data.train_bin={data.train_bin}", f"data.val_bin={data.val_bin}",
             f"data.tokenizer={tmp_path / 'data' / 'tokenizer'}"]
    # the comparison has teeth: the two ranks' halves of a step differ in their target counts
    loaders = [PackedLoader(data.train_bin, 32, 1, rank=r, world_size=2, seed=1337) for r in (0, 1)]
    counts = [count_targets(ld.next_batch().targets) for ld in loaders]
    assert counts[0] != counts[1], counts
    ref = tmp_path / "ref"
    cfg = load_config("qwen3_tiny", TINY + paths + ["train.batch_size=4", f"train.out_dir={ref}"])
    loop.train(cfg, progress_bar=False)
    run = tmp_path / "ddp"
    torchrun(2, train_args(run, *paths, "train.parallel=ddp", "train.batch_size=1", "train.grad_accum=2"))
    assert logged(run, key="n_targets") == logged(ref, key="n_targets")
    assert_same_losses(logged(run), logged(ref), range(1, 7))
    assert_same_losses(logged(run, key="grad_norm"), logged(ref, key="grad_norm"), range(1, 7))


def test_sft_under_torchrun_builds_once_and_trains_on_two_ranks(tmp_path):
    out = tmp_path / "sft"
    text = torchrun(2, ["-m", "deepwish", "sft", "--preset", "qwen3_tiny", "--data", "examples/chat.jsonl",
                        "--out", str(out), "--sample-tokens", "2", "--set", "model.n_layers=1",
                        "--set", "train.parallel=ddp", "--set", "train.batch_size=1", "--set", "train.steps=2",
                        "--set", "train.seq_len=48", "--set", "train.eval_batches=1", "--set", "train.log_every=1"])
    assert text.count("wrote ") == 1 and "[deepwish] sample:" in text and "[deepwish] done:" in text
    assert (out / "chat_template.json").is_file() and len(list((out / "data").glob(".built-*"))) == 1
    assert len(logged(out)) == 2
