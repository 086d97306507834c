from transformers import AutoModelForCausalLM, AutoTokenizer

from at_core.prompts import render_prompt
from at_core.tiny.tokenizer import END_THINK, THINK


def test_round_trip_through_autotokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in [
        "What is 23 + 47? Let's think step by step.",
        "<think>\nOkay.\n 23 * 40 = 920\n\n</think>\n\n\\boxed{1081}",
        "  spaces   and\ttabs\n\n\nnewlines 9876543210 ünïcödé ∑",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_think_tokens_are_single_and_template_opens_think(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for t in (THINK, END_THINK):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<think>\n")
    assert render_prompt(tok, "What is 1 + 1?", "ellipsis").endswith("<think>\n...\n")
    assert render_prompt(tok, "What is 1 + 1?", "no_think").endswith("...\n</think>\n\n")


def test_model_directory_loads(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert not model.config.tie_word_embeddings
