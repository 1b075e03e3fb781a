"""Pipeline stages in one process: a model cut into stages computes what the whole model does,
on both backends, and the partition plan counts a tied head's embedding on the stage holding it."""

import copy

import numpy as np
import pytest

import ellm
from ellm.metadata import generate_metadata, plan_partition
from ellm.stage import Stage
from conftest import BACKENDS, build

MAX_SEQ_LEN = 64


def stages_of(args, state_dict, counts):
    stages = [ellm.Transformer(args, s) for s in Stage.split(args, counts)]
    for s in stages:
        s.load_state_dict(state_dict)
    return stages


@pytest.fixture(scope="module")
def args(checkpoint):
    a = copy.deepcopy(checkpoint.args)
    a.max_seq_len, a.max_batch_size = MAX_SEQ_LEN, 2
    return a


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("counts", [[15, 15], [1, 28, 1]])
def test_stages_compose_to_the_whole_model(backend, counts, args, state_dict):
    whole = build(backend, args, state_dict)
    stages = stages_of(args, state_dict, counts)
    assert [s.stage.num_layers for s in stages] == counts
    tokens = np.array([1, 504, 3458, 314, 260, 1, 22, 33])
    slots = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    positions = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    for step in range(3):  # a ragged prefill, then two decode steps
        expected = whole.step(tokens, slots, positions)
        x = tokens
        for s in stages[:-1]:
            x = s.step(x, slots, positions)
            assert x.shape == (len(tokens), whole.model_args.hidden_size)
        got = stages[-1].step(x, slots, positions)
        # the same kernels on the same rows, the weights loaded apart: bit for bit (f32 weights sit on
        # 64-byte boundaries, so no product's summation order depends on where a load put them)
        np.testing.assert_array_equal(got, expected)
        ends = np.array([np.flatnonzero(slots == b)[-1] for b in (0, 1)])
        tokens, positions, slots = expected[ends].argmax(-1), positions[ends] + 1, np.array([0, 1])
    assert [s.slot_length(0) for s in stages] == [whole.slot_length(0)] * len(stages)


def test_a_stage_holds_only_its_tensors(args, state_dict):
    first, last = stages_of(args, state_dict, [10, 20])
    names_first = set(first.weight_types())
    assert "model.embed_tokens.weight" in names_first and "model.layers.9.mlp.up_proj.weight" in names_first
    assert "model.layers.10.mlp.up_proj.weight" not in names_first
    # the tied head is the embedding matrix: the last stage holds it, and no embedding step of its own
    assert "model.embed_tokens.weight" in last.weight_types()
    assert last.stage.embeds is False and last.stage.heads is True
    assert first.stage.engine_config(first.model_args)["num_hidden_layers"] == 10


def test_a_stage_refuses_what_it_cannot_run(args, state_dict):
    first, last = stages_of(args, state_dict, [15, 15])
    with pytest.raises(ValueError, match="takes hidden states"):
        last.step([1, 2], [0, 0], [0, 1])
    with pytest.raises(ValueError, match=r"\[rows, 576\]"):
        last.step(np.zeros((2, 5), np.float32), [0, 0], [0, 1])
    with pytest.raises(ValueError, match="whole model"):
        first.forward([[1, 2]])
    with pytest.raises(ValueError, match="whole model"):
        first.generate([[1, 2]], 4)
    with pytest.raises(ValueError, match="at least one layer"):
        Stage(3, 3, True, False)
    with pytest.raises(ValueError, match="add up"):
        Stage.split(first.model_args, [15, 14])


def test_the_plan_counts_a_tied_embedding_on_both_ends(gguf_path):
    meta = generate_metadata(gguf_path)
    embedding = meta.block("embed").weight_bytes
    assert meta.block("head").shared_weight_bytes == embedding  # SmolLM2 ties its head to the embedding
    one = plan_partition(meta, [{"node_id": "a"}])
    two = plan_partition(meta, [{"node_id": "a"}, {"node_id": "b"}])
    assert one.nodes[0].weight_bytes == meta.totals["weight_bytes"]  # held once on one node
    assert sum(n.weight_bytes for n in two.nodes) == meta.totals["weight_bytes"] + embedding
    # a node too small for its layers plus the embedding copy is not given the head
    need_last = two.nodes[1].weight_bytes + two.nodes[1].kv_cache_bytes
    tight = plan_partition(meta, [{"node_id": "a"}, {"node_id": "b", "memory_bytes": need_last - 1}])
    assert tight.nodes[1].weight_bytes + tight.nodes[1].kv_cache_bytes <= need_last - 1


@pytest.mark.skipif(not ellm.rust_available(), reason="needs the Rust extension ellm._lowlevel (GGUF blocks as stored)")
def test_a_stage_from_the_file_reads_only_its_blocks(gguf_path, args):
    """from_pretrained with a stage keeps the file's quantized blocks for its own layers only."""
    whole = ellm.Transformer.from_pretrained(gguf_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
    first, last = (ellm.Transformer.from_pretrained(gguf_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=2, stage=s)
                   for s in Stage.split(args, [15, 15]))
    assert first.weight_types()["model.layers.14.self_attn.q_proj.weight"] == \
        whole.weight_types()["model.layers.14.self_attn.q_proj.weight"]
    assert last.weight_types()["model.layers.0.self_attn.q_proj.weight"] == \
        whole.weight_types()["model.layers.15.self_attn.q_proj.weight"]
    bytes_of = lambda m: sum(m._engine.weight_bytes())  # noqa: E731
    embedding = dict(zip(whole.weight_types(), whole._engine.weight_bytes()))["model.embed_tokens.weight"]
    assert bytes_of(first) + bytes_of(last) == bytes_of(whole) + embedding  # the tied head's copy
    tokens, slots, positions = np.array([1, 504, 3458]), np.zeros(3, int), np.arange(3)
    np.testing.assert_array_equal(last.step(first.step(tokens, slots, positions), slots, positions),
                                  whole.step(tokens, slots, positions))


def test_a_partition_plan_becomes_stages_or_a_clear_error(gguf_path, tmp_path, checkpoint):
    from ellm.distributed.placement import node_resources, placements

    args = checkpoint.args
    plan = plan_partition(generate_metadata(gguf_path), [{"node_id": "a"}, {"node_id": "b"}])
    saved = tmp_path / "plan.json"
    saved.write_text(plan.to_json())
    got = placements(str(saved), args, gguf_path)
    assert [p.node_id for p in got] == ["a", "b"]
    assert got[0].stage.first == 0 and got[0].stage.embeds and not got[0].stage.heads
    assert got[0].stage.stop == got[1].stage.first and got[1].stage.stop == 30 and got[1].stage.heads
    assert placements(plan, args, gguf_path) == placements(["a", "b"], args, gguf_path) == got
    four = placements(["a", "b", "c", "d"], args, gguf_path)  # the planner gives every node a layer
    assert all(p.stage.num_layers > 0 for p in four) and four[-1].stage.stop == 30 and four[-1].stage.heads
    head_only = {"nodes": [{"node_id": "a", "blocks": ["embed"] + [f"layers.{i}" for i in range(30)]},
                           {"node_id": "d", "blocks": ["head"]}]}
    with pytest.raises(ValueError, match="node 'd' has no decoder layers"):
        placements(head_only, args, gguf_path)
    with pytest.raises(ValueError, match="31 nodes for 30 decoder layers"):
        placements([f"n{i}" for i in range(31)], args, gguf_path)
    gap = {"nodes": [{"node_id": "a", "blocks": ["embed", "layers.0"]},
                     {"node_id": "b", "blocks": [f"layers.{i}" for i in range(2, 30)] + ["head"]}]}
    with pytest.raises(ValueError, match="starts at layer 2, expected 1"):
        placements(gap, args, gguf_path)
    with pytest.raises(ValueError, match="covers 10 layers, the model has 30"):
        placements({"nodes": [{"node_id": "a", "blocks": [f"layers.{i}" for i in range(10)]}]}, args, gguf_path)
    with pytest.raises(FileNotFoundError):
        placements(str(tmp_path / "missing.json"), args, gguf_path)
    cluster = {"CPU": 2.0, "a": 1.0, "node:10.0.0.7": 1.0}
    assert node_resources("a", cluster) == {"a": 0.001}
    assert node_resources("10.0.0.7", cluster) == {"node:10.0.0.7": 0.001}
    with pytest.raises(ValueError, match=r"no Ray node is 'b'.*--resources"):
        node_resources("b", cluster)
