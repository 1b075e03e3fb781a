"""KV slots and the ragged step against the single-sequence forward, and the continuous-batching
engine's promises: results independent of neighbours, prefix reuse, cancellation, a bounded queue."""

import threading
import time

import numpy as np
import pytest
from conftest import BACKENDS, DATA, load_on

import ellm
from ellm.errors import ModelBusyError
from ellm.serving import ContextLengthError, Engine, QueueFullError, sampling_params

TINY = f"{DATA}/archs/llama"


def tiny(backend, **kw):
    return load_on(backend, TINY, max_batch_size=4, **kw)


def rows(*runs):
    """(tokens, slots, positions) of runs given as (slot, first position, tokens)."""
    out = ([], [], [])
    for slot, start, toks in runs:
        out[0].extend(toks)
        out[1].extend([slot] * len(toks))
        out[2].extend(range(start, start + len(toks)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_step_equals_each_sequence_alone(backend):
    m = tiny(backend)
    a, b = [5, 17, 33, 2, 90, 14, 71, 9], [8, 8, 101, 7, 250]
    alone_a, alone_b = m.forward([a])[0], None
    m.reset_cache()
    alone_b = m.forward([b])[0]
    m.reset_cache()
    # a's first 3 tokens first, then a's next 5 beside all of b, in one step (slots 2 and 0)
    m.step(*rows((2, 0, a[:3])))
    out = m.step(*rows((2, 3, a[3:]), (0, 0, b)))
    np.testing.assert_allclose(out[:5], alone_a[3:], atol=1e-5)
    np.testing.assert_allclose(out[5:], alone_b, atol=1e-5)
    assert m.slot_length(2) == 8 and m.slot_length(0) == 5 and m.slot_length(1) == 0
    # logits only where asked, in row order
    m.truncate_slot(0, 4)
    only = m.step([b[4], 3], [0, 1], [4, 0], logits=[True, False])
    np.testing.assert_allclose(only, alone_b[4:5], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_and_copy_against_forward(backend):
    m = tiny(backend)
    p = [5, 17, 33, 2, 90, 14, 71, 9]
    full = m.forward([p])[0]
    m.reset_cache()
    m.step(*rows((1, 0, p[:6] + [250, 251])))  # a slot that went another way after 6 tokens
    m.truncate_slot(1, 6)
    np.testing.assert_allclose(m.step(*rows((1, 6, p[6:]))), full[6:], atol=1e-5)
    m.copy_slot(1, 3, 4)  # fork the first 4 positions into slot 3
    assert m.slot_length(3) == 4
    np.testing.assert_allclose(m.step(*rows((3, 4, p[4:]))), full[4:], atol=1e-5)
    m.clear_slot(3)
    assert m.slot_length(3) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_batches_are_refused_and_change_nothing(backend):
    m = tiny(backend)
    m.step(*rows((0, 0, [1, 2, 3])))
    cases = [
        (rows((0, 5, [1])), "holds 3 positions.*never written"),  # a gap
        (rows((1, 0, [1]), (0, 3, [2]), (1, 1, [3])), "adjacent"),
        (([1, 2], [0, 0], [3, 5]), "consecutive"),
        (rows((9, 0, [1])), "slot 9 does not exist"),
        (rows((0, 3, [4000])), "out of range"),
        (([1, 2], [0], [3, 4]), "one slot, position"),
        (rows((0, 3, [1] * m.model_args.max_seq_len)), "past max_seq_len"),
    ]
    for (tokens, slots, positions), message in cases:
        with pytest.raises(ValueError, match=message):
            m.step(tokens, slots, positions)
    assert m.slot_length(0) == 3
    with pytest.raises(ValueError, match="slot must be"):
        m.truncate_slot(4, 0)
    with pytest.raises(ValueError, match="cannot copy 5"):
        m.copy_slot(0, 1, 5)


def test_allocated_slots_keep_forward_and_generate_off():
    m = tiny("rust")
    assert m.allocate_slot() == 0 and m.allocate_slot(2) == 2
    with pytest.raises(ValueError, match="already allocated"):
        m.allocate_slot(2)
    with pytest.raises(ModelBusyError, match=r"slots \[0\]"):
        m.forward([[1, 2]])
    with pytest.raises(ModelBusyError, match=r"slots \[0, 2\]"):
        m.generate([[1], [2], [3]], 2)
    m.free_slot(0)
    assert m.forward([[1, 2]]).shape == (1, 2, m.model_args.vocab_size)  # slot 0 is free again
    m.free_slot(2)


@pytest.fixture(scope="module")
def llm():
    llm = ellm.Llama(max_batch_size=4, max_seq_len=512)
    yield llm
    llm.close()


def engine_for(llm, **options):
    return Engine(llm.model, llm.tokenizer, llm.stop_ids, **options)


def params(llm, **kw):
    kw.setdefault("max_tokens", 16)
    return sampling_params(room=400, vocab_size=llm.model.model_args.vocab_size, **kw)


def text_of(request):
    events = list(request)
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events[-1].finish_reason


PROMPT = ("The history of the Roman Empire spans many centuries, beginning with the founding of the city and "
          "ending with the fall of Constantinople. Its roads, laws and language shaped Europe long after the last "
          "emperor, and scholars still argue about why it fell. Historians say that")
OTHERS = ["Once upon a time,", "def fibonacci(n):\n    if n <", "1, 2, 3, 4, 5, 6, 7, 8, 9,"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_request_gives_the_same_text_alone_and_beside_others(llm, temperature):
    engine = engine_for(llm, chunk=16, token_budget=40)  # several steps of prompt chunks, budget shared
    try:
        ids = llm.tokenizer.encode(PROMPT)
        assert len(ids) > 2 * 16
        own = dict(temperature=temperature, top_p=0.8, top_k=50, seed=7, max_tokens=24)  # others draw without cuts
        alone = text_of(engine.submit(ids, params(llm, **own)))
        engine.close()
        engine = engine_for(llm, chunk=16, token_budget=40)  # fresh slots: no prefix to reuse
        others = [engine.submit(llm.tokenizer.encode(t), params(llm, temperature=0.7, seed=i, max_tokens=30))
                  for i, t in enumerate(OTHERS)]
        time.sleep(0.05)  # the others are under way: this one joins at other positions
        beside = engine.submit(ids, params(llm, **own))
        assert text_of(beside) == alone
        assert all(text_of(o)[1] for o in others)
    finally:
        engine.close()


def test_prefix_reuse_takes_whole_chunks_and_changes_nothing(llm):
    engine = engine_for(llm, chunk=16)
    try:
        ids = llm.tokenizer.encode(PROMPT)
        first = text_of(engine.submit(ids, params(llm, temperature=0)))
        computed = engine.stats()["prompt_tokens_total"]
        second = text_of(engine.submit(ids, params(llm, temperature=0)))
        reused = len(ids) - (engine.stats()["prompt_tokens_total"] - computed)
        assert reused == (len(ids) // 16) * 16 - (16 if len(ids) % 16 == 0 else 0) and reused >= 32
        assert second == first
        other = text_of(engine.submit(ids[:20] + llm.tokenizer.encode(" and so"), params(llm, temperature=0)))
        assert other[1]
    finally:
        engine.close()


def test_stops_length_and_context(llm):
    engine = engine_for(llm)
    try:
        ids = llm.tokenizer.encode("The capital of France is")
        text, tokens, reason = text_of(engine.submit(ids, params(llm, temperature=0, max_tokens=5)))
        assert reason == "length" and len(tokens) == 5
        text, _, reason = text_of(engine.submit(ids, params(llm, temperature=0, max_tokens=20, stop=["."])))
        assert reason == "stop" and text == " Paris"
        chat = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}]))
        _, tokens, reason = text_of(engine.submit(chat, params(llm, temperature=0, max_tokens=100)))
        assert reason == "stop" and tokens[-1] in llm.stop_ids
        with pytest.raises(ContextLengthError, match="maximum context length is 512"):
            engine.submit([1] * 512, params(llm))
        banned = text_of(engine.submit(ids, params(llm, temperature=0, max_tokens=3,
                                                   logit_bias={tokens_of(llm, " Paris"): -100})))[0]
        assert not banned.startswith(" Paris")
    finally:
        engine.close()


def tokens_of(llm, text):
    (token,) = llm.tokenizer.encode(text)
    return token


def test_cancel_frees_the_slot_and_a_full_queue_refuses_at_once(llm):
    engine = engine_for(llm, max_queue=1)
    try:
        ids = llm.tokenizer.encode("Tell me a long story:")
        running = [engine.submit(ids, params(llm, max_tokens=300, temperature=1.0, seed=i)) for i in range(4)]
        waiting = engine.submit(ids, params(llm, max_tokens=2))
        with pytest.raises(QueueFullError):
            engine.submit(ids, params(llm))
        time.sleep(0.2)
        assert engine.stats()["slots_in_use"] == 4
        running[0].cancel()
        assert waiting.finished.wait(5.0)  # it took the cancelled request's slot
        for r in running[1:]:
            r.cancel()
        deadline = time.time() + 1.0
        while engine.stats()["slots_in_use"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["slots_in_use"] == 0
        assert running[0].finish_reason == "cancelled"
    finally:
        engine.close()


def test_openai_shaped_calls_on_llama(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = llm.create_chat_completion(messages, max_tokens=24, temperature=0)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["finish_reason"] in ("stop", "length")
    chunks = list(llm.create_chat_completion(messages, max_tokens=24, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert joined == whole["choices"][0]["message"]["content"] and "Paris" in joined
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    done = llm.create_completion("The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    lp = done["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert lp["token_logprobs"][0] == pytest.approx(max(lp["top_logprobs"][0].values()))
    with pytest.raises(ValueError, match="n=2"):
        llm.create_completion("x", n=2)
    with pytest.raises(ValueError, match="temperature"):
        llm.create_chat_completion(messages, temperature=5)


def test_threads_share_one_engine(llm):
    prompts = [f"Count from {i}:" for i in range(6)]
    alone = [llm.create_completion(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = llm.create_completion(prompts[i], max_tokens=12, temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_engine_on_the_numpy_backend():
    """The engine runs on the NumPy fallback too, and a request there gives generate's greedy ids."""
    model = tiny("numpy")
    engine = Engine(model, _IdTokenizer(), [], chunk=4)
    try:
        p = sampling_params(max_tokens=5, room=50, vocab_size=model.model_args.vocab_size, temperature=0)
        a, b = [5, 17, 33, 2, 90, 14], [8, 8, 101]
        requests = [engine.submit(a, p), engine.submit(b, p)]
        got = [[t for e in r for t in e.token_ids] for r in requests]
    finally:
        engine.close()
    assert got == [model.generate([x], 5, temperature=0)[0][0] for x in (a, b)]


class _IdTokenizer:
    """Token ids as text, for a model without a tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_penalties_and_bias_change_the_logits_as_openai_defines_them():
    from ellm.sampling import apply_logit_bias, apply_penalties

    logits = np.array([1.0, 2.0, 3.0, 4.0])
    out = apply_penalties(logits, {1: 3, 3: 1}, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [1.0, 2.0 - 0.5 - 0.75, 3.0, 4.0 - 0.5 - 0.25])
    np.testing.assert_allclose(apply_logit_bias(logits, {0: 100.0, 2: -100.0}), [101.0, 2.0, -97.0, 4.0])
    np.testing.assert_array_equal(logits, [1.0, 2.0, 3.0, 4.0])  # the caller's row is left alone
    row = logits.copy()
    assert apply_logit_bias(row, {1: -100.0}, in_place=True) is row and row[1] == -98.0
    assert apply_penalties(row, {0: 2}, presence=1.0, frequency=0.5, in_place=True) is row and row[0] == -1.0


def test_frequency_penalty_curbs_repetition(llm):
    engine = engine_for(llm)
    try:
        ids = llm.tokenizer.encode("1, 1, 1, 1, 1, 1, 1, 1,")

        def most_repeated(**kw):
            tokens = text_of(engine.submit(ids, params(llm, temperature=0, max_tokens=16, **kw)))[1]
            return max(tokens.count(t) for t in set(tokens))

        plain, penalized = most_repeated(), most_repeated(frequency_penalty=2.0, presence_penalty=1.0)
        assert plain >= 6 and penalized <= 3  # greedy repeats ' 1' and ',' six times each
    finally:
        engine.close()


@pytest.mark.parametrize("failing", ["step", "truncate_slot"])
def test_a_model_that_fails_ends_every_request_with_the_reason(failing):
    """A model that stops working (a pipeline stage that died, say) fails the requests it was
    running, the one being admitted included, and every later one; nothing waits forever."""
    model = tiny("numpy", max_seq_len=64)
    settings = {"room": 32, "vocab_size": model.model_args.vocab_size}
    broken = RuntimeError("stage 0 died")

    def fail(*args, **kwargs):
        raise broken

    setattr(model, failing, fail)
    engine = Engine(model, None, [], chunk=8)
    try:
        request = engine.submit([1, 2, 3], sampling_params(max_tokens=4, **settings))
        assert request.finished.wait(5), "the request was never told"
        with pytest.raises(ellm.serving.EngineClosedError, match="stage 0 died"):
            list(request)
        assert not engine.alive
        with pytest.raises(ellm.serving.EngineClosedError, match="stage 0 died"):
            engine.submit([1, 2], sampling_params(max_tokens=2, **settings))
    finally:
        engine.close()
