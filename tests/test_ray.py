"""ellm on Ray (the `ray` marker): a local cluster of two nodes made here (1 CPU each, custom
resources "a" and "b"), the bundled model split into two pipeline stages of half the layers each,
and two engine replicas behind one OpenAI-compatible endpoint on Ray Serve."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import httpx
import openai

import ellm

ray = pytest.importorskip("ray", reason="Ray cannot be installed here (make test installs the extra ellm[ray])")
pytest.importorskip("ray.serve", reason="Ray Serve cannot be installed here (make test installs ellm[ray])")

from ray.cluster_utils import Cluster  # noqa: E402

from ellm.distributed import PipelineModel, StageFailedError  # noqa: E402
from conftest import free_port, wait_healthy  # noqa: E402

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not ellm.rust_available(), reason="needs the Rust extension ellm._lowlevel (the Ray tests run "
                                                           "in the suite's first pass, where it is built)"),
]

MAX_SEQ_LEN = 128
HALF = 15  # SmolLM2-135M has 30 layers


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"a": 1}})
    c.add_node(num_cpus=1, resources={"b": 1})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def half_plan(layers=30):
    return {"nodes": [
        {"node_id": "a", "blocks": ["embed"] + [f"layers.{i}" for i in range(HALF)]},
        {"node_id": "b", "blocks": [f"layers.{i}" for i in range(HALF, layers)] + ["head"]},
    ]}


@pytest.fixture(scope="module")
def whole(gguf_path):
    return ellm.Transformer.from_pretrained(gguf_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)


def pipeline(gguf_path):
    return PipelineModel.from_pretrained(gguf_path, half_plan(), max_seq_len=MAX_SEQ_LEN, max_batch_size=2,
                                         threads_per_stage=1)


def test_two_stages_give_the_single_process_logits(cluster, gguf_path, whole):
    rng = np.random.default_rng(7)
    prompts = [[1] + rng.integers(100, 20000, 23).tolist(), [1, 22, 33] + rng.integers(100, 20000, 9).tolist()]
    with pipeline(gguf_path) as model:
        # the prompts' 36 rows go through the stages as two micro-batches, one slot each
        runs = [(0, 0, 24, 0), (1, 24, 36, 0)]
        assert model._pipeline._micro_batches(runs, 36) == [(0, 24), (24, 36)]
        assert model._pipeline._micro_batches([(0, 0, 1, 30), (1, 1, 2, 20)], 2) == [(0, 2)]  # decode: one
        assert model.num_stages == 2
        stages = model.stages()
        assert [(s["first_layer"], s["stop_layer"], s["node_id"]) for s in stages] == [(0, HALF, "a"),
                                                                                      (HALF, 30, "b")]
        assert stages[0]["pid"] != stages[1]["pid"]
        # a ragged batch of two: the prompts in one step, then 16 greedy decode steps, logits compared
        whole.reset_cache()
        ids = np.concatenate(prompts)
        slots = np.repeat([0, 1], [len(p) for p in prompts])
        positions = np.concatenate([np.arange(len(p)) for p in prompts])
        last = np.cumsum([len(p) for p in prompts]) - 1
        flags = np.isin(np.arange(len(ids)), last)
        chosen = []
        for _ in range(17):
            got = model.step(ids, slots, positions, flags)
            expected = whole.step(ids, slots, positions, flags)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
            ids = expected.argmax(-1)
            assert (got.argmax(-1) == ids).all()
            chosen.append(ids)
            positions = positions[last] + 1
            slots, flags, last = np.array([0, 1]), np.ones(2, bool), np.array([0, 1])
        assert [model.slot_length(s) for s in (0, 1)] == [whole.slot_length(s) for s in (0, 1)] == [
            len(prompts[0]) + 16, len(prompts[1]) + 16]
        # generate (and forward) through the same API as a Transformer: greedy ids identical
        model.reset_cache()
        whole.reset_cache()
        assert model.generate(prompts, 16, temperature=0) == whole.generate(prompts, 16, temperature=0)
        np.testing.assert_allclose(model.forward([[1, 2, 3]]), whole.forward([[1, 2, 3]]), rtol=0, atol=1e-4)


def test_each_stage_holds_about_its_share_of_the_file(cluster, gguf_path, record_property):
    file_bytes = os.path.getsize(gguf_path)
    with pipeline(gguf_path) as model:
        stages = model.stages()
    for s in stages:
        share = s["weight_bytes"] / file_bytes
        record_property(f"stage{s['first_layer']}_weight_bytes", s["weight_bytes"])
        record_property(f"stage{s['first_layer']}_loaded_rss_bytes", s["loaded_rss_bytes"])
        print(f"stage layers {s['first_layer']}..{s['stop_layer'] - 1}: weights {s['weight_bytes']:,} bytes "
              f"({share:.0%} of the {file_bytes:,}-byte file), resident after loading {s['loaded_rss_bytes']:,} bytes")
        # each half holds its 15 layers plus the embedding (the first to embed, the last as the tied head)
        assert 0.45 < share < 0.75
        # what the process took on to load the stage is its weights, not the whole model
        assert s["loaded_rss_bytes"] < 1.3 * s["weight_bytes"] + 16e6
    assert sum(s["weight_bytes"] for s in stages) < 1.6 * file_bytes


def test_a_stage_killed_mid_generation_fails_the_generation_within_seconds(cluster, gguf_path):
    with pipeline(gguf_path) as model:
        steps = model.generate_steps([[1, 504, 3458]], 64, temperature=0)
        next(steps), next(steps)
        os.kill(model.stages()[1]["pid"], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(StageFailedError, match=r"stage 1 \(layers 15\.\.29 on node 'b'\) died"):
            for _ in steps:
                pass
        assert time.monotonic() - started < 10
        assert "died" in model.check_health()
        with pytest.raises(StageFailedError, match="cannot run"):  # and at once from then on
            model.forward([[1, 2]])


def test_a_stage_that_cannot_be_placed_or_loaded_is_a_clear_error(cluster, gguf_path, tmp_path):
    started = time.monotonic()
    with pytest.raises(StageFailedError, match=r"stage 0 .* did not start within 3 s .*2 CPU free"):
        PipelineModel.from_pretrained(gguf_path, half_plan(), threads_per_stage=2, load_timeout=3)  # 1-CPU nodes
    assert time.monotonic() - started < 15
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(open(gguf_path, "rb").read()[:100_000])  # the header, cut short
    with pytest.raises(ValueError, match="broken.gguf"):  # the driver reads the header first
        PipelineModel.from_pretrained(str(broken), half_plan())
    with pytest.raises(ValueError, match="dtype"):  # a stage's own error, not Ray's wrapper
        PipelineModel.from_pretrained(gguf_path, half_plan(), dtype="q3_x", threads_per_stage=1)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "ellm"]


def test_ellm_serve_ray_plan_serves_the_pipeline_and_health_turns_503_when_a_stage_dies(cluster, gguf_path,
                                                                                     tmp_path):
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(half_plan()))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ellm", "serve", gguf_path, "--port", str(port), "--slots", "2",
                             "--max-seq-len", str(MAX_SEQ_LEN), "--ray-plan", str(plan), "--ray-address",
                             cluster.address, "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, seconds=90)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.completions.create(model="m", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens == 8
        expected = ellm.Llama(gguf_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=2).create_completion(
            "The capital of France is", max_tokens=8, temperature=0)
        assert reply.choices[0].text == expected["choices"][0]["text"]
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "ellm" and a["name"].endswith("stage0")]
        assert len(names) == 1
        stage0 = ray.get_actor(names[0], namespace="ellm")
        os.kill(ray.get(stage0.ping.remote()), signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model="m", prompt="Hello", max_tokens=8, temperature=0)
        assert failed.value.status_code in (500, 503) and "stage 0" in str(failed.value)
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and "stage 0" in health.text
        assert time.monotonic() - started < 15
    finally:
        proc.terminate()
        proc.wait(15)


def test_two_replicas_behind_one_endpoint_both_serve(cluster, gguf_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ellm", "serve", gguf_path, "--replicas", "2", "--port", str(port),
                             "--slots", "2", "--max-queue", "0", "--max-seq-len", str(MAX_SEQ_LEN), "--ray-address",
                             cluster.address, "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, seconds=120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        replies = [None] * 4
        # The 4 must overlap, or a replica that finished its two could take the next two as well. So
        # they are sent together, end of text is banned and every reply runs its 64 tokens: with 24,
        # the engine once finished two before the others reached Ray's router.
        endless = {str(t): -100 for t in ellm.Tokenizer.from_gguf(gguf_path).eos_ids}
        together = threading.Barrier(4)

        def ask(i):
            together.wait(60)
            replies[i] = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}], max_tokens=64,
                temperature=0, logit_bias=endless)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert all(r is not None and r.usage.completion_tokens > 0 for r in replies)
        served_by = {r.system_fingerprint for r in replies}
        assert len(served_by) == 2, served_by  # each replica names its process in system_fingerprint
        # the same request gets the same answer whichever replica takes it
        again = [client.completions.create(model="m", prompt="Paris is", max_tokens=6, temperature=0)
                 for _ in range(4)]
        assert len({r.choices[0].text for r in again}) == 1
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: Serve and its replicas are shut down on the way out
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    from ray import serve

    assert not serve.status().applications, "the replicas outlived ellm serve"
