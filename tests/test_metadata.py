"""ellm.metadata on the bundled model and on hand-made tensors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ellm import ModelFormatError
from ellm.metadata import (MetadataConfig, MetadataGenerator, ModelMetadata, estimate, generate_metadata,
                           measure_machine, plan_partition)
from ellm.metadata.naming import block_of, layer_type


def independent_count(batch, seq):
    """FLOPs of SmolLM2-135M written out from its config."""
    h, q, kv, inter, layers, vocab = 576, 576, 192, 1536, 30, 49152
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    attn_prefill = sum(2 * 2 * q * t for t in range(1, seq + 1)) * batch  # query t sees t keys
    attn_decode = 2 * 2 * q * (seq + 1) * batch
    prefill = layers * (per_token * batch * seq + attn_prefill) + 2 * h * vocab * batch * seq
    decode = layers * (per_token * batch + attn_decode) + 2 * h * vocab * batch
    return prefill, decode, layers * 2 * 4 * batch * seq * kv


@pytest.fixture(scope="module")
def bundled_meta(gguf_path):
    return generate_metadata(gguf_path, batch_size=2, sequence_length=100)


def test_bundled_model_numbers(bundled_meta):
    m = bundled_meta
    assert m.totals["params"] == 134_515_008 and m.model_type == "transformer"
    assert sum(b.name.startswith("layers.") for b in m.blocks) == 30
    assert [m.blocks[0].name, m.blocks[-1].name] == ["embed", "head"]
    by_name = {x.name: x for x in m.layers}
    assert by_name["token_embd.weight"].dtype == "Q8_0"
    assert by_name["token_embd.weight"].weight_bytes == 49152 * 576 // 32 * 34
    assert by_name["blk.0.ffn_down.weight"].dtype == "Q4_1"
    assert by_name["blk.0.ffn_down.weight"].weight_bytes == 576 * 1536 // 32 * 20
    assert by_name["blk.0.attn_norm.weight"].weight_bytes == 576 * 4
    prefill, decode, kv = independent_count(2, 100)
    assert (m.totals["flops_prefill"], m.totals["flops_decode"], m.totals["kv_cache_bytes"]) == (prefill, decode, kv)
    assert m.total_layers == len(m.layers) == 272


def test_same_numbers_from_every_source(bundled_meta, tmp_path, checkpoint, state_dict, models):
    from safetensors.numpy import save_file

    save_file(state_dict, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(checkpoint.args.to_dict()))
    keys = ("params", "flops_prefill", "flops_decode", "kv_cache_bytes")
    expect = {k: bundled_meta.totals[k] for k in keys}
    for source in (tmp_path, tmp_path / "model.safetensors", models["rust"], state_dict):
        m = generate_metadata(source, batch_size=2, sequence_length=100)
        assert {k: m.totals[k] for k in keys} == expect, type(source)
        assert m.totals["weight_bytes"] == 4 * 134_515_008  # f32 as stored


def test_kv_cache_dtype_sizes_the_cache_alone(bundled_meta, gguf_path):
    half = generate_metadata(gguf_path, batch_size=2, sequence_length=100, kv_cache_dtype="f16")
    assert half.kv_cache_dtype == "f16" and bundled_meta.kv_cache_dtype == "f32"
    assert half.totals["kv_cache_bytes"] * 2 == independent_count(2, 100)[2]
    assert {k: v for k, v in half.totals.items() if k != "kv_cache_bytes"} == \
        {k: v for k, v in bundled_meta.totals.items() if k != "kv_cache_bytes"}
    assert ModelMetadata.from_dict(json.loads(half.to_json())).kv_cache_dtype == "f16"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        generate_metadata(gguf_path, kv_cache_dtype="int8")


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_a_transformer_is_counted_with_its_own_kv_cache(gguf_path, kv):
    from ellm import Transformer

    model = Transformer.from_pretrained(gguf_path, kv_cache_dtype=kv, max_seq_len=128)
    m = generate_metadata(model, batch_size=2, sequence_length=100)
    assert m.kv_cache_dtype == kv
    assert m.totals["kv_cache_bytes"] == independent_count(2, 100)[2] // (2 if kv == "f16" else 1)


def test_compute_required_by_the_original_formula():
    state = {"model.layers.0.self_attn.q_proj.weight": np.zeros((4, 8), np.float32),
             "model.embed_tokens.weight": np.zeros((10, 8), np.float32),
             "model.norm.weight": np.zeros(8, np.float32)}
    m = generate_metadata(state, batch_size=2, sequence_length=1024)
    got = {x.name: x.compute_required for x in m.layers}
    # params x cost x batch x sequence/512: 32*4*2*2, 80*0.5*2*2, 8*1*2*2
    assert got == {"model.layers.0.self_attn.q_proj.weight": 512.0, "model.embed_tokens.weight": 160.0,
                   "model.norm.weight": 32.0}
    assert m.total_compute == 704.0 and m.model_type == "transformer"
    plain = generate_metadata({"fc1.weight": np.zeros((3, 4), np.float16)}, batch_size=2, sequence_length=1024)
    assert plain.model_type == "generic" and plain.layers[0].compute_required == 12 * 2.0 * 2
    assert plain.layers[0].dtype == "F16" and plain.layers[0].weight_bytes == 24


@pytest.mark.parametrize("name, shape, kind, block", [
    ("model.layers.3.self_attn.q_proj.weight", (8, 8), "attention", "layers.3"),
    ("model.layers.3.mlp.down_proj.weight", (8, 8), "linear", "layers.3"),
    ("model.layers.3.input_layernorm.weight", (8,), "layernorm", "layers.3"),
    ("model.embed_tokens.weight", (8, 8), "embedding", "embed"),
    ("model.norm.weight", (8,), "layernorm", "head"),
    ("lm_head.weight", (8, 8), "linear", "head"),
    ("transformer.h.5.attn.c_attn.weight", (8, 24), "attention", "layers.5"),
    ("transformer.h.5.mlp.c_fc.weight", (8, 32), "linear", "layers.5"),
    ("transformer.h.5.ln_1.weight", (8,), "layernorm", "layers.5"),
    ("transformer.wte.weight", (8, 8), "embedding", "embed"),
    ("transformer.ln_f.weight", (8,), "layernorm", "head"),
    ("bert.encoder.layer.2.attention.self.query.weight", (8, 8), "attention", "layers.2"),
    ("bert.encoder.layer.2.attention.output.LayerNorm.weight", (8,), "layernorm", "layers.2"),
    ("bert.encoder.layer.2.intermediate.dense.weight", (32, 8), "linear", "layers.2"),
    ("bert.embeddings.word_embeddings.weight", (8, 8), "embedding", "embed"),
    ("bert.pooler.dense.weight", (8, 8), "pooling", "head"),
    ("blk.7.attn_q.weight", (8, 8), "attention", "layers.7"),
    ("blk.7.ffn_up.weight", (8, 8), "linear", "layers.7"),
    ("blk.7.attn_norm.weight", (8,), "layernorm", "layers.7"),
    ("token_embd.weight", (8, 8), "embedding", "embed"),
    ("output_norm.weight", (8,), "layernorm", "head"),
    ("features.0.conv.weight", (16, 3, 3, 3), "conv2d", "head"),
])
def test_layer_types_and_blocks(name, shape, kind, block):
    assert (layer_type(name, shape), block_of(name)) == (kind, block)


def test_json_round_trip(tmp_path, bundled_meta):
    path = tmp_path / "meta.json"
    MetadataGenerator.save_metadata(bundled_meta, path)
    loaded = ModelMetadata.load(path)
    assert loaded.to_dict() == bundled_meta.to_dict()
    keys = set(json.loads(path.read_text()))
    assert {"model_name", "model_type", "batch_size", "sequence_length", "layers", "total_compute", "total_layers",
            "generated_at", "node_id", "blocks", "totals"} <= keys
    cfg = MetadataConfig("smol", "model.gguf", node_id="n1")
    assert (cfg.batch_size, cfg.sequence_length, cfg.node_id) == (1, 512, "n1")


def test_partition_balances_uneven_nodes_and_respects_memory(bundled_meta):
    nodes = [{"node_id": "slow", "relative_speed": 1.0}, {"node_id": "fast", "relative_speed": 3.0}]
    plan = plan_partition(bundled_meta, nodes)
    slow, fast = plan.nodes
    assert slow.blocks[0] == "embed" and fast.blocks[-1] == "head"
    assert slow.blocks + fast.blocks == [b.name for b in bundled_meta.blocks]
    assert len(fast.blocks) > len(slow.blocks)
    times = [n.estimated_seconds for n in plan.nodes]
    assert max(times) == pytest.approx(plan.bottleneck_seconds)
    total = estimate(bundled_meta, 100.0, 20.0)["decode_seconds"]
    assert plan.bottleneck_seconds < 0.4 * total  # near the ideal 1/4 share, far below one node alone
    json.loads(plan.to_json())
    need = bundled_meta.totals["weight_bytes"] + bundled_meta.totals["kv_cache_bytes"]
    capped = [{"node_id": "a", "memory_bytes": need // 2 + 40_000_000}, {"node_id": "b", "memory_bytes": need // 2 + 40_000_000}]
    plan = plan_partition(bundled_meta, capped)
    assert all(n.weight_bytes + n.kv_cache_bytes <= n.memory_bytes for n in plan.nodes)
    with pytest.raises(ValueError, match="cannot be placed"):
        plan_partition(bundled_meta, [{"node_id": "a", "memory_bytes": need // 3}, {"node_id": "b", "memory_bytes": need // 3}])


def test_estimate_and_machine(bundled_meta):
    e = estimate(bundled_meta, peak_gflops=100.0, bandwidth_gbs=10.0)
    layer = next(b for b in e["blocks"] if b["name"] == "layers.0")
    assert layer["decode_bound"] == "memory" and layer["prefill_bound"] == "compute"
    assert e["decode_seconds"] == pytest.approx(sum(b["decode_seconds"] for b in e["blocks"]))
    machine = measure_machine(seconds=0.2)
    assert machine.peak_gflops > 1 and machine.bandwidth_gbs > 0.5


def test_bad_files_give_clear_errors(tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as fh:
        cut.write_bytes(fh.read(3000))
    with pytest.raises(ModelFormatError, match="truncated"):
        generate_metadata(cut)
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        generate_metadata(tmp_path / "text.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelFormatError, match="not a model"):
        generate_metadata(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        generate_metadata(tmp_path / "missing.gguf")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFormatError):
        generate_metadata(tmp_path / "bad.safetensors")


def test_cli_metadata(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ellm", "metadata", "--sequence-length", "64", "--nodes", "a:1,b:2:2e9",
                        "--node-id", "n0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["node_id"] == "n0" and out["sequence_length"] == 64 and len(out["partition"]["nodes"]) == 2
    assert "layers.29" in r.stderr and "total" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ellm", "metadata", "--out", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and ModelMetadata.load(tmp_path / "m.json").totals["params"] == 134_515_008
    r = subprocess.run([sys.executable, "-m", "ellm", "metadata", "--kv-cache-dtype", "f16"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["totals"]["kv_cache_bytes"] == 30 * 2 * 2 * 512 * 192
    r = subprocess.run([sys.executable, "-m", "ellm", "metadata", "--nodes", "a:fast"], capture_output=True, text=True)
    assert r.returncode == 1 and "--nodes" in r.stderr and "Traceback" not in r.stderr
