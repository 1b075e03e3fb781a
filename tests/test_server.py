"""`ellm serve` as a client sees it: the official openai client against a server started here on
127.0.0.1 (a free port, polled on /health), with the bundled model on 2 slots."""

import json
import subprocess
import sys
import threading
import time

import pytest

import httpx  # the test extra's, as openai is: missing, they fail here rather than skip
import openai

pytest.importorskip("fastapi", reason="the server needs the extra ellm[server] (make test installs it)")
pytest.importorskip("sse_starlette", reason="the server needs the extra ellm[server] (make test installs it)")

import ellm  # noqa: E402
from conftest import free_port, wait_healthy  # noqa: E402

KEY = "test-key"
MAX_SEQ_LEN = 256
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    if not ellm.rust_available():
        pytest.skip("needs the Rust extension ellm._lowlevel (the server on the NumPy backend is too slow for this suite)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ellm", "serve", "--port", str(port), "--slots", "2",
                             "--max-queue", "2", "--api-key", KEY, "--max-seq-len", str(MAX_SEQ_LEN),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def slots_in_use(server):
    text = httpx.get(f"{server}/metrics").text
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("ellm_slots_in_use"))))


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server}/metrics").text
    assert "# TYPE ellm_requests_running gauge" in metrics and "ellm_slots_total 2" in metrics


def test_chat_stream_joins_to_the_whole_reply(client):
    whole = client.chat.completions.create(model="x", messages=CHAT, max_tokens=24, temperature=0)
    reply = whole.choices[0].message.content
    assert "Paris" in reply and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 10 and whole.usage.total_tokens == whole.usage.prompt_tokens + \
        whole.usage.completion_tokens
    stream = client.chat.completions.create(model="x", messages=CHAT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_max_completion_tokens(client):
    done = client.chat.completions.create(model="x", messages=CHAT, max_completion_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "length"


def test_health_is_503_while_the_model_loads():
    from fastapi.testclient import TestClient

    from ellm.serving.server import create_app

    release = threading.Event()
    llm = ellm.Llama(max_batch_size=1, max_seq_len=64)

    def load():
        release.wait(10)
        return llm.serving()

    with TestClient(create_app(load)) as web:
        loading = web.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "loading"
        assert web.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        release.set()
        deadline = time.time() + 10
        while web.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.01)
        assert web.get("/health").json() == {"status": "ok"}
        assert web.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()["usage"]["completion_tokens"] == 2
    llm.close()


def test_completion_stream_usage_and_finish_reasons(client):
    done = client.completions.create(model="x", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    streamed = client.completions.create(model="x", prompt="The capital of France is", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    stopped = client.completions.create(model="x", prompt="The capital of France is", max_tokens=20, temperature=0,
                                        stop=["."])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == " Paris"
    lp = client.completions.create(model="x", prompt="The capital of France is", max_tokens=3, temperature=0,
                                   logprobs=2).choices[0].logprobs
    assert lp.tokens[0] == " Paris" and len(lp.top_logprobs[0]) == 2
    chat_lp = client.chat.completions.create(model="x", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                             top_logprobs=3).choices[0].logprobs.content
    assert len(chat_lp) == 3 and len(chat_lp[0].top_logprobs) == 3 and chat_lp[0].logprob <= 0


def test_seed_reproducibility(client):
    def run(seed):
        return client.completions.create(model="x", prompt="Once upon a time", max_tokens=20, temperature=1.0,
                                         seed=seed).choices[0].text
    assert run(3) == run(3)
    assert len({run(3), run(4), run(5)}) > 1


def test_a_prompt_alone_and_beside_three_others(client):
    prompt = "Write one sentence about the sea:"
    alone = client.completions.create(model="x", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    others = ["List three fruits:", "def add(a, b):", "The year 1066 is known for"]
    results = {}

    def run(i, p, delay):
        time.sleep(delay)
        results[i] = client.completions.create(model="x", prompt=p, max_tokens=24, temperature=0).choices[0].text

    threads = [threading.Thread(target=run, args=(i, p, 0.0)) for i, p in enumerate(others)]
    threads.append(threading.Thread(target=run, args=(9, prompt, 0.15)))  # joins while the others run
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[9] == alone


def test_four_streams_on_two_slots_all_finish_and_overlap(client):
    spans = {}

    def run(i):
        stream = client.completions.create(model="x", prompt=f"Story number {i}:", max_tokens=24, temperature=0.8,
                                           seed=i, stream=True)
        first = None
        pieces = []
        for c in stream:
            first = first or time.perf_counter()
            pieces.append(c.choices[0].text)
        spans[i] = (first, time.perf_counter(), c.choices[0].finish_reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spans) == 4 and all(s[2] in ("stop", "length") for s in spans.values())
    # two slots: at least two streams were producing tokens at the same time
    overlapping = [(a, b) for a in spans for b in spans if a < b
                   and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlapping


def test_a_client_that_leaves_a_stream_frees_its_slot(server, client):
    stream = client.completions.create(model="x", prompt="Tell me a very long story:", max_tokens=200,
                                       temperature=0.8, seed=1, stream=True)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    assert slots_in_use(server) == 1
    stream.close()
    deadline = time.time() + 1.0
    while slots_in_use(server) and time.time() < deadline:
        time.sleep(0.02)
    assert slots_in_use(server) == 0


def test_clients_that_time_out_do_not_hold_up_the_next(server, gguf_path):
    impatient = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=0.5)
    errors = []
    # end of text banned, so no reply can end early and beat the timeout
    endless = {str(t): -100 for t in ellm.Tokenizer.from_gguf(gguf_path).eos_ids}

    def run(i):
        try:
            impatient.completions.create(model="x", prompt=f"An endless list {i}:", max_tokens=200, temperature=0.8,
                                         seed=i, logit_bias=endless)
        except (openai.APITimeoutError, openai.APIStatusError) as exc:  # timed out, or 503 from the full queue
            errors.append(type(exc).__name__)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 20
    started = time.perf_counter()
    while slots_in_use(server) and time.perf_counter() - started < 1.0:  # the abandoned requests are dropped
        time.sleep(0.02)
    assert slots_in_use(server) == 0
    quick = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=10)
    done = quick.completions.create(model="x", prompt="Hi", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason == "length" and time.perf_counter() - started < 5.0


def post(server, path, body, key=KEY, content_type="application/json"):
    data = json.dumps(body) if not isinstance(body, (str, bytes)) else body
    return httpx.post(f"{server}{path}", content=data, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})


@pytest.mark.parametrize("body, status, says", [
    ({"model": "x"}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role"),
    ({"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": CHAT, "n": 2}, 400, "n=2"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool calls"),
    ({"messages": CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "word " * MAX_SEQ_LEN}]}, 400, "maximum context length"),
])
def test_bad_chat_requests(server, body, status, says):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    if "context" in says:
        assert error["code"] == "context_length_exceeded"


def test_bad_transport(server, client):
    assert post(server, "/v1/completions", "prompt=hi", content_type="text/plain").status_code == 415
    assert post(server, "/v1/completions", "{not json").status_code == 400
    wrong = post(server, "/v1/completions", {"prompt": "hi"}, key="nope")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="x", prompt="hi", max_tokens=0)


def test_a_full_queue_gets_503_at_once(server):
    statuses = []

    def run(i):
        r = post(server, "/v1/completions", {"prompt": f"Count to {i}:", "max_tokens": 60, "temperature": 0.8,
                                             "seed": i})
        statuses.append((r.status_code, r.json().get("error", {}).get("code")))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (503, "queue_full") in statuses and sum(s == 200 for s, _ in statuses) >= 4  # 2 slots + 2 queued
