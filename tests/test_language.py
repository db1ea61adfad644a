"""The LM interface as the official code has it: control string, EOS, lengths, control words, decoding score."""

import random

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from dynrefer.config import LanguageConfig
from dynrefer.language import (LanguageHead, control_text, load_lm, normalize_caption, training_control_words,
                               word_tokenizer)
from dynrefer.tags import parse_phrases

WORDS = "a the red blue green small large striped dotted circle square triangle left of right".split()
ARCH = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
        "num_heads": 4, "feed_forward_proj": "relu", "tie_word_embeddings": True}


def head(**kw) -> LanguageHead:
    torch.manual_seed(0)
    return LanguageHead(LanguageConfig(arch=ARCH, vocabulary=WORDS, freeze=False, **kw), region_dim=16).eval()


@pytest.mark.parametrize("raw, expected", [
    ("A Red circle.", "a red circle"),
    ('the "striped" (small) square!  left:of; a~triangle#*', "the striped small square left of a triangle"),
    ("  spaces   everywhere  ", "spaces everywhere"),
])
def test_captions_are_normalised_as_lavis(raw, expected):
    assert normalize_caption(raw) == expected
    assert normalize_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_control_string_is_comma_joined_with_a_bar():
    assert control_text(["red circle", "small"]) == "red circle,small|"
    assert control_text([]) == "|"


def test_control_and_caption_ids_end_with_eos_within_32_tokens():
    h = head()
    eos = h.tokenizer.eos_token_id
    ids = h._controls([["red", "circle"], []])
    assert ids[0] == h.tokenizer("red , circle |", add_special_tokens=False)["input_ids"] + [eos]
    assert ids[1][-1] == eos and len(ids[1]) == 2
    long = h._ids([" ".join(["red"] * 100)], eos=True)[0]
    assert len(long) == 32 and long[-1] == eos


def test_training_control_words_are_a_shuffled_random_subset_of_tags_and_phrases():
    tags, phrases = ["red", "circle", "small"], parse_phrases("a small red circle")
    assert phrases == ["small", "red circle", "circle"]
    rng = random.Random(0)
    draws = [training_control_words(tags, phrases, 0.5, 0.5, rng) for _ in range(4000)]
    pool = set(tags) | set(phrases)
    assert all(set(d) <= pool and len(d) == len(set(d)) for d in draws)
    empty = sum(not d for d in draws) / len(draws)
    assert empty == pytest.approx(0.5 + 0.5 * 0.5 ** len(pool), abs=0.03)  # all dropped, or each dropped
    kept = [d for d in draws if d]
    share = sum(len(d) for d in draws) / (len(draws) * len(pool))
    assert share == pytest.approx(0.25, abs=0.02)  # half the time nothing; else each with probability 1/2
    orders = {tuple(d) for d in kept if set(d) == {"red", "circle"}}
    assert orders == {("red", "circle"), ("circle", "red")}  # shuffled, not caption order
    assert training_control_words(tags, phrases, 0.0, 0.0, random.Random(1)) != []


def test_caption_score_is_the_probability_of_the_returned_caption():
    """length_penalty 0: the beam's score is the summed log-probability of its tokens (EOS included), not a
    length-normalised one; the caption score is its exp."""
    h = head(num_beams=2, repetition_penalty=1.0, max_new_tokens=6)
    torch.manual_seed(3)
    regions, words = torch.randn(3, 4, 16), [["red"], [], ["circle", "small"]]
    optimizer = torch.optim.Adam(h.parameters(), lr=3e-3)
    h.train()
    for _ in range(15):  # a little training, so that captions are words and their probabilities are not ~0 or ~1
        optimizer.zero_grad()
        h.loss(regions, words, ["a red circle", "the small blue square", "a striped triangle left of a circle"]
               ).backward()
        optimizer.step()
    h.eval()
    sequences, log_probs = h.generate_ids(regions, words)
    controls = h._controls(words)
    lengths = set()
    for i in range(3):
        tokens = sequences[i, 1:].tolist()  # after the decoder start token
        if h.tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(h.tokenizer.eos_token_id) + 1]
        tokens = [t for t in tokens if t != h.tokenizer.pad_token_id] or tokens
        lengths.add(len(tokens))
        prefix = torch.cat([h.proj(regions[i]), h._embed(controls[i], True)])[None]
        with torch.no_grad():
            logits = h.lm(inputs_embeds=prefix, labels=torch.tensor([tokens])).logits
        expected = torch.log_softmax(logits.double(), -1)[0, torch.arange(len(tokens)), torch.tensor(tokens)].sum()
        assert float(log_probs[i]) == pytest.approx(float(expected), rel=1e-4)
    assert max(lengths) > 1 and float(log_probs.min()) < -0.5
    captions, scores = h.generate(regions, words)
    assert scores == pytest.approx(log_probs.exp().tolist(), rel=1e-6) and all(0 < s <= 1 for s in scores)


def test_dense_act_fn_is_set_on_a_loaded_lm(tmp_path):
    torch.manual_seed(0)
    tok = word_tokenizer(WORDS)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5", safe_serialization=True)
    tok.save_pretrained(tmp_path / "t5")
    lm, _ = load_lm(LanguageConfig(path=str(tmp_path / "t5"), dense_act_fn="gelu"))
    assert lm.config.dense_act_fn == "gelu"
    act = lm.encoder.block[0].layer[1].DenseReluDense.act
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x))  # exact GELU, not the tanh "gelu_new"
    default, _ = load_lm(LanguageConfig(path=str(tmp_path / "t5")))
    assert default.config.dense_act_fn == "gelu_new"
