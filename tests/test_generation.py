"""The LM loops of runtime/pipeline.py on paths CI never ran: batched generation that stops on its own
(no fixed token count), and the device-sampler loop (`Pipeline.tokens` on CUDA) driven on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.registry import load_model
from models.sampling import NEG_INF, Sampler
from runtime.pipeline import Pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cv3():
    return load_model("cosyvoice3-tiny")


def _utterances(model, texts):
    speaker = model.make_speaker(None, None)
    return [model.make_utterance(t, speaker) for t in texts]


class _Greedy(Sampler):
    """Deterministic stand-in for a family sampler: the most likely id, stop tokens masked for the
    first `min_len` steps (the family rule). Deterministic, so a row must come out of a batch exactly as
    it comes out alone."""

    def __init__(self, stop_tokens: range, min_len: int):
        self.stop, self.min_len = stop_tokens, min_len

    def __call__(self, logits, history, step):
        x = logits.clone()
        if step < self.min_len:
            x[self.stop.start:self.stop.stop] = NEG_INF
        return int(x.argmax())

    def to_device(self, *args, **kwargs):  # pragma: no cover - the batched loop samples on the host
        raise NotImplementedError

    def slots(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


def test_batched_generation_stops_each_row_on_its_own(cv3, monkeypatch):
    """generate_batch without a fixed count: every row stops at its own stop token or its own length
    limit, a finished row idles (fed a filler id under its mask) while the other goes on, and no row's
    tokens depend on its neighbour: with a deterministic sampler each row equals its single run."""
    pipe = Pipeline(cv3, "torch")
    monkeypatch.setattr(cv3, "make_sampler", lambda utt, gen, fixed: _Greedy(cv3.lm.stop_tokens, utt.min_tokens))
    short, long_, limited = _utterances(cv3, ["Hi.", "A longer sentence, with more words in it.", "Hello there."])
    limited = dataclasses.replace(limited, max_tokens=limited.min_tokens - 3)  # its limit comes before any stop
    for utts in ([short, long_], [limited, short]):
        batched = pipe.generate_batch(utts, torch.Generator().manual_seed(0))
        assert batched == [pipe.generate(u, torch.Generator().manual_seed(0)) for u in utts]
        assert len(batched[0]) != len(batched[1])  # the rows finish at different steps
        for u, toks in zip(utts, batched):
            assert not any(cv3.lm.is_stop(t) for t in toks)
            if u is limited:
                assert len(toks) == u.max_tokens
            else:  # stopped by a stop token after the minimum
                assert u.min_tokens <= len(toks) < u.max_tokens


def test_batched_generation_with_family_samplers(cv3):
    """The same without the stand-in: CosyVoice's sampler, stops and limits per row."""
    pipe = Pipeline(cv3, "torch")
    utts = _utterances(cv3, ["Hi.", "A longer sentence, with more words in it."])
    batched = pipe.generate_batch(utts, torch.Generator().manual_seed(1))
    for u, toks in zip(utts, batched):
        assert u.min_tokens <= len(toks) < u.max_tokens
        assert not any(cv3.lm.is_stop(t) for t in toks)
    assert len(batched[0]) != len(batched[1])


def _reference_device_loop(model, utt, seed, fixed_tokens):
    """The device-sampler rule driven by hand on the LM module itself: the family's sampler twin on the
    CPU, ids fed back with the family's `next_input_id`, stop tokens checked on the host."""
    lm = model.graph_module("llm")
    gen = torch.Generator().manual_seed(seed)
    vocab = model.graph_specs()["llm"].outputs[0].shape[1]
    pick = model.make_sampler(utt, gen, fixed_tokens).to_device(vocab, "cpu", generator=gen)
    steps = fixed_tokens if fixed_tokens is not None else utt.max_tokens
    ids = torch.tensor([utt.prompt_ids])
    out = []
    with torch.inference_mode():
        logits, keys, values = lm(ids, torch.ones_like(ids), *lm.empty_cache(1))
        for _ in range(steps):
            token = int(pick(logits))
            if fixed_tokens is None and model.lm.is_stop(token):
                break
            out.append(token)
            step = torch.tensor([[model.lm.next_input_id(token)]])
            logits, keys, values = lm(step, torch.ones(1, keys.shape[3] + 1, dtype=torch.int64), keys, values)
    return out


@pytest.mark.parametrize("name,fixed", [("cosyvoice3-tiny", None), ("orpheus-tiny", 14)])
def test_device_sampler_path_of_the_pipeline(name, fixed, monkeypatch):
    """Pipeline.tokens' CUDA branch (sampler.to_device, the chosen id fed back on the device, one host
    read per token for the stop check) run on the CPU: it really takes that branch, and its tokens are
    those of the same rule driven by hand. CosyVoice3 stops on its own (after its minimum length);
    Orpheus' random-weight preset keeps to its frame grammar with a fixed count."""
    model = load_model(name)
    pipe = Pipeline(model, "torch")
    sampler_cls = type(model.make_sampler(_utterances(model, ["x"])[0], torch.Generator(), fixed))
    twins = []
    real_to_device = sampler_cls.to_device

    def recording_to_device(self, vocab, device, *args, **kwargs):
        twins.append((vocab, str(device)))
        return real_to_device(self, vocab, device, *args, **kwargs)

    monkeypatch.setattr(sampler_cls, "to_device", recording_to_device)
    pipe.sample_on_device = True  # what a CUDA pipeline does, here on the CPU
    utt = _utterances(model, ["Hello there."])[0]
    tokens = pipe.generate(utt, torch.Generator().manual_seed(4), fixed)
    vocab = model.graph_specs()["llm"].outputs[0].shape[1]
    assert twins == [(vocab, "cpu")]  # the device branch ran, once per utterance
    assert tokens == _reference_device_loop(model, utt, 4, fixed)
    assert not any(model.lm.is_stop(t) for t in tokens)
    if fixed is None:
        assert utt.min_tokens <= len(tokens) < utt.max_tokens  # ended by a stop token
    else:
        from models.snac import tokens_to_codes

        assert len(tokens) == fixed and tokens_to_codes(tokens)[3].ok


@pytest.mark.parametrize("name,fixed", [("cosyvoice3-tiny", None), ("orpheus-tiny", 14)])
def test_batched_generation_samples_on_the_device_like_one_request(name, fixed):
    """generate_batch's device branch (each row's own device sampler, one host read per step for all
    rows; on the host, Orpheus' 156,940-logit rows cost ~12 ms a token on an H100): one request comes
    out exactly as Pipeline.tokens' device branch makes it, and a batch of two is seeded (the same
    tokens again), stops each row on its own and keeps the family's rules."""
    model = load_model(name)
    pipe = Pipeline(model, "torch")
    pipe.sample_on_device = True  # what a CUDA pipeline does, here on the CPU
    calls = []
    sampler_cls = type(model.make_sampler(_utterances(model, ["x"])[0], torch.Generator(), fixed))
    real_host = sampler_cls.__call__
    sampler_cls.__call__ = lambda self, *a: calls.append(1) or real_host(self, *a)
    try:
        one = _utterances(model, ["Hello there."])
        assert pipe.generate_batch(one, torch.Generator().manual_seed(4), fixed) == \
            [pipe.generate(one[0], torch.Generator().manual_seed(4), fixed)]
        two = _utterances(model, ["Hi.", "A longer sentence, with more words in it."])
        first = pipe.generate_batch(two, torch.Generator().manual_seed(5), fixed)
        assert first == pipe.generate_batch(two, torch.Generator().manual_seed(5), fixed)
    finally:
        sampler_cls.__call__ = real_host
    assert calls == []  # no host sampling anywhere
    for u, toks in zip(two, first):
        assert not any(model.lm.is_stop(t) for t in toks)
        if fixed is None:
            assert u.min_tokens <= len(toks) < u.max_tokens  # each row ended by its own stop token
        else:
            from models.snac import tokens_to_codes

            assert len(toks) == fixed and tokens_to_codes(toks)[3].ok
    if fixed is None:
        assert len(first[0]) != len(first[1])
