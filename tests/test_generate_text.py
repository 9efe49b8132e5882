"""`deepwish.generate_text(model, tokenizer, prompt, ...)`: text in, continuation out, with a
deepwish tokenizer and with a transformers tokenizer; the same tokens as `generate`."""
import pytest
import torch

import deepwish
from deepwish.config import load_config
from deepwish.data.tokenizer import train_bpe
from deepwish.generate import generate
from deepwish.model import Transformer

TEXT = ["ROMEO: what light through yonder window breaks", "JULIET: o Romeo Romeo wherefore art thou",
        "the quick brown fox jumps over the lazy dog"] * 4


@pytest.fixture(scope="module")
def tok_model():
    tok = train_bpe(TEXT, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(load_config("qwen3_tiny", ["model.n_layers=2", f"model.vocab_size={tok.vocab_size}"]).model)
    return tok, model.eval()


def test_greedy_text_is_generate_decoded(tok_model):
    tok, model = tok_model
    ids = tok.encode("ROMEO:")
    new = generate(model, [ids], 12, stop_tokens=[tok.eos_id])[0]
    want = tok.decode(new[:-1] if new and new[-1] == tok.eos_id else new)
    assert deepwish.generate_text(model, tok, "ROMEO:", 12) == want
    # a list of prompts gives a list; beam search and sampling go through the same call
    two = deepwish.generate_text(model, tok, ["ROMEO:", "JULIET:"], 6)
    assert isinstance(two, list) and len(two) == 2 and two[0] == deepwish.generate_text(model, tok, "ROMEO:", 6)
    beam = deepwish.generate_text(model, tok, "ROMEO:", 6, num_beams=3)
    from deepwish.generate import beam_search
    best = beam_search(model, ids, 6, 3, stop_tokens=[tok.eos_id])[0][0]
    assert beam == tok.decode(best[:-1] if best and best[-1] == tok.eos_id else best)
    a = deepwish.generate_text(model, tok, "ROMEO:", 8, temperature=1.0, seed=3)
    assert a == deepwish.generate_text(model, tok, "ROMEO:", 8, temperature=1.0, seed=3)


def test_eos_ends_the_text_and_is_left_out(tok_model):
    tok, model = tok_model
    with torch.no_grad():  # make the eos the model's certain next token
        model.lm_head.weight.zero_() if model.lm_head is not None else model.embed.weight.zero_()
        (model.lm_head or model.embed).weight[tok.eos_id].fill_(1.0)
    try:
        assert deepwish.generate_text(model, tok, "ROMEO:", 5) == ""
        assert deepwish.generate_text(model, tok, "ROMEO:", 3, stop_at_eos=False) == tok.decode([tok.eos_id] * 3)
    finally:
        torch.manual_seed(0)
        model.reset_parameters()


def test_transformers_tokenizer(tok_model, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok, model = tok_model
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf,
                                     eos_token="<|endoftext|>")
    assert hf_tok.encode("ROMEO:") == tok.encode("ROMEO:")
    assert deepwish.generate_text(model, hf_tok, "ROMEO:", 10) == deepwish.generate_text(model, tok, "ROMEO:", 10)


def test_bad_tokenizer_and_empty_prompt(tok_model):
    tok, model = tok_model
    with pytest.raises(TypeError, match="deepwish Tokenizer .* or a transformers tokenizer, got dict"):
        deepwish.generate_text(model, {}, "x")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        deepwish.generate_text(model, tok, "")
