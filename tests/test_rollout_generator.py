"""The in-process Generator: log-prob semantics, determinism, stopping rules, batching."""
from __future__ import annotations

import pytest
import torch

from at_rollout.server.generator import Generator, SamplingParams, SamplingParamsError, logprob_temperature


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(gen):
    from at_core.prompts import render_prompt

    tok = gen.tokenizer
    out = [tok.encode(render_prompt(tok, f"What is {a} + {b}?", "ellipsis")) for a, b in ((1, 2), (34, 5), (60, 71))]
    out[1] = out[1][:9]  # different lengths exercise the left padding
    return out


def recompute(model, prompt, sample, temperature):
    """The trainer's definition: full forward, log_softmax(logits / T) before any truncation."""
    ids = torch.tensor([prompt + sample.output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    lp = torch.log_softmax(logits / logprob_temperature(temperature), -1)
    return lp.gather(1, torch.tensor(sample.output_ids)[:, None]).squeeze(1)


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_p=0.8, top_k=20),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.0),
])
def test_logprobs_match_a_full_forward_before_truncation(gen, prompts, params):
    out = gen.generate(prompts, SamplingParams(max_new_tokens=16, n=2, sampling_seed=1, **params))
    assert len(out) == 2 * len(prompts)
    for s in out:
        ref = recompute(gen.model, prompts[s.prompt_index], s, params["temperature"])
        assert len(s.logprobs) == len(s.output_ids) == s.finish_reason.get("length", len(s.output_ids))
        assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-5), (ref, s.logprobs)


def test_logprob_temperature_is_one_for_greedy():
    assert logprob_temperature(0.0) == 1.0
    assert logprob_temperature(0.6) == 0.6


def test_same_seed_same_samples_whatever_the_batch(gen, prompts):
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, sampling_seed=5)
    a = gen.generate(prompts, sp)
    b = gen.generate(prompts, sp)
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    # Prompt 2 alone, keyed as item 2 of its request, samples what it sampled in the batch.
    alone = gen.generate([prompts[2]], sp, seed_keys=[2])
    assert [s.output_ids for s in alone] == [s.output_ids for s in a[6:9]]
    other = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, n=3, sampling_seed=6))
    assert [s.output_ids for s in other] != [s.output_ids for s in a]
    # The n samples of one prompt differ from each other.
    assert len({tuple(s.output_ids) for s in a[:3]}) == 3


def test_top_k_one_is_greedy(gen, prompts):
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    k1 = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.9, top_k=1, sampling_seed=3))
    assert [s.output_ids for s in greedy] == [s.output_ids for s in k1]


def test_stop_token_stop_string_length_and_ignore_eos(gen, prompts):
    no_eos = Generator(gen.model, gen.tokenizer, eos_token_ids=[])  # only the request's stop rules apply
    ids = no_eos.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0))[0].output_ids
    assert len(ids) == 20
    # ignore_eos: the model's own EOS does not end the sample either.
    ignored = gen.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert ignored.output_ids == ids and ignored.finish_reason == {"type": "length", "length": 20}
    natural = gen.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    if len(natural.output_ids) < 20:  # it met EOS: the EOS token is the last output token
        assert natural.finish_reason == {"type": "stop", "matched": natural.output_ids[-1]}
        assert natural.output_ids[-1] in gen.eos_token_ids
    # stop_token_ids: the fourth greedy token ends the sample, and is part of the output.
    stop_tok = no_eos.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0,
                                                           stop_token_ids=[ids[3]]))[0]
    first = ids.index(ids[3])
    assert stop_tok.output_ids == ids[:first + 1]
    assert stop_tok.finish_reason == {"type": "stop", "matched": ids[3]}
    # ignore_eos also ignores stop_token_ids (SGLang's rule).
    both = no_eos.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True,
                                                       stop_token_ids=[ids[3]]))[0]
    assert both.output_ids == ids
    # A stop string: the text is cut before it, the tokens up to the one completing it are kept.
    text = gen.tokenizer.decode(ids, skip_special_tokens=False)
    stop = gen.tokenizer.decode(ids[5:7], skip_special_tokens=False)
    cut = no_eos.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop],
                                                      skip_special_tokens=False))[0]
    assert cut.finish_reason == {"type": "stop", "matched": stop}
    assert cut.text == text[: text.index(stop)]
    assert len(cut.output_ids) <= 7 and ids[: len(cut.output_ids)] == cut.output_ids


def test_rows_finish_independently_and_leave_the_batch(gen, prompts):
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, n=2, sampling_seed=2) for n in (0, 3, 25)]
    out = gen.generate(prompts, params)
    assert [len(s.output_ids) for s in out] == [0, 0, 3, 3, 25, 25]
    assert out[0].finish_reason == {"type": "length", "length": 0}
    # Same samples as when each prompt runs by itself: finishing rows do not disturb the others.
    for i in (1, 2):
        alone = gen.generate([prompts[i]], params[i], seed_keys=[i])
        assert [s.output_ids for s in alone] == [s.output_ids for s in out[2 * i:2 * i + 2]]
        for a, b in zip(alone, out[2 * i:2 * i + 2]):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_max_batch_rows_splits_into_waves_with_the_same_result(gen, prompts):
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, sampling_seed=9)
    whole = gen.generate(prompts, sp)
    small = Generator(gen.model, gen.tokenizer, max_batch_rows=2)
    assert [s.output_ids for s in small.generate(prompts, sp)] == [s.output_ids for s in whole]


def test_abort_ends_rows_with_abort(gen, prompts):
    calls = []

    def should_abort():
        calls.append(1)
        return len(calls) > 4

    out = gen.generate(prompts, SamplingParams(max_new_tokens=50, temperature=1.0, ignore_eos=True),
                       should_abort=should_abort)
    assert all(s.finish_reason["type"] == "abort" and len(s.output_ids) == 4 for s in out)


def test_bad_params_name_the_field():
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(top_p=0.0)
    assert err.value.field == "top_p"
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(n=0)
    assert err.value.field == "n"


def _same_samples(a, b):
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    for x, y in zip(a, b):
        assert x.finish_reason == y.finish_reason
        assert max([abs(p - q) for p, q in zip(x.logprobs, y.logprobs)] + [0.0]) < 1e-5


def _mixed_params():
    """Different n, lengths and a stop token per prompt: rows finish at different steps, so the
    batch compacts and whole prompts leave the shared prefix."""
    stops = list(range(10, 110))  # about one token in four ends a row
    return [SamplingParams(max_new_tokens=30, temperature=1.0, n=4, sampling_seed=4, stop_token_ids=stops),
            SamplingParams(max_new_tokens=2, temperature=1.0, n=1, sampling_seed=4),
            SamplingParams(max_new_tokens=12, temperature=0.8, n=5, sampling_seed=4)]


def test_shared_prefix_decode_samples_what_the_repeated_cache_samples(gen, prompts):
    assert gen._shared_prefix  # the tiny Qwen2 (grouped-query attention) decodes over the shared prefix
    plain = Generator(gen.model, gen.tokenizer, shared_prefix=False)
    _same_samples(gen.generate(prompts, _mixed_params()), plain.generate(prompts, _mixed_params()))


def test_shared_prefix_decode_on_a_multi_head_llama(tiny_model_dir, prompts):
    """Another family (Llama), one query head per KV head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, attn_implementation="sdpa",
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    shared, plain = Generator(model, tok), Generator(model, tok, shared_prefix=False)
    assert shared._shared_prefix
    _same_samples(shared.generate(prompts, _mixed_params()), plain.generate(prompts, _mixed_params()))


def test_sliding_window_models_keep_the_plain_cache(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_sliding_window=True, sliding_window=8)
    assert not Generator(model)._shared_prefix
