"""Hostile and broken input: each gets a clear exception before anything large is built, and the
two backends agree on what they refuse and on non-finite numbers."""

import json
import math
import os
import shutil
import struct
import time

import numpy as np
import pytest

import ellm
from ellm import ModelArgs, Transformer, ops
from ellm.errors import ModelFormatError

from conftest import BACKENDS, DATA
from hf_to_gguf import convert, finish

TINY = os.path.join(DATA, "archs", "llama")


def safetensors_file(path, header, data, pad=0):
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    raw += b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture()
def folder(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(TINY, out)
    return out


def test_safetensors_header_of_any_length_reads_unaligned_data(tmp_path, folder):
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    data, header, at = b"", {}, 0
    for name, t in tensors.items():
        raw = t.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        data, at = data + raw, at + len(raw)
    base = json.dumps(header).encode()
    pad = (4 - len(base) % 4) % 4 + 1  # the header's length is not a multiple of 4: data unaligned
    safetensors_file(folder / "model.safetensors", header, data, pad=pad)
    gold = np.load(os.path.join(TINY, "golden.npz"))
    logits = Transformer.from_pretrained(folder).forward(gold["input_ids"])
    assert np.abs(logits - gold["logits"]).max() < 1e-4


@pytest.mark.parametrize("case, header, match", [
    ("negative", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, "data_offsets"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlaps"),
    ("past the end", {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "truncated"),
    ("gap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "unused"),
    ("shape", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, "needs 12 bytes"),
    ("metadata", {"__metadata__": [1], "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "__metadata__"),
    ("duplicate", b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                  b'"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', "duplicate key"),
    ("dtype", {"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, "dtype"),
])
def test_corrupt_safetensors_headers_are_named(tmp_path, case, header, match):
    path = safetensors_file(tmp_path / "x.safetensors", header, np.arange(4, dtype=np.float32).tobytes())
    from ellm.weights.safetensors import read_header

    with pytest.raises(ModelFormatError, match=match):
        read_header(str(path))


def test_chat_template_limits(monkeypatch):
    from ellm import tokenizer

    messages = [{"role": "user", "content": "hi"}]
    monkeypatch.setattr(tokenizer, "TEMPLATE_SECONDS", 0.3)
    started = time.perf_counter()
    endless = "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"
    with pytest.raises(ModelFormatError, match="ran for more than"):
        tokenizer._render_template(endless, messages, True)
    assert time.perf_counter() - started < 2
    for huge in ("{{ 'a' * 10**9 }}", "{{ 'a'.ljust(10**9) }}", "{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}"):
        with pytest.raises(ModelFormatError, match="chat template"):
            tokenizer._render_template(huge, messages, True)
    assert tokenizer._render_template("{{ messages[0].content * 3 }}", messages, True) == "hihihi"


@pytest.mark.parametrize("changes, match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                       "original_max_position_embeddings": 64}}, "low_freq_factor"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"attention_bias": 1}, "attention_bias"),
])
def test_config_values_that_would_compute_garbage_are_refused(changes, match):
    d = json.load(open(os.path.join(TINY, "config.json")))
    d.pop("rope_parameters")
    d.update(changes)
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_dict(d).validate()


@pytest.mark.parametrize("field", ["num_hidden_layers", "max_seq_len", "max_batch_size", "head_dim", "vocab_size"])
def test_absurd_sizes_fail_fast_with_memory_error(field):
    d = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    d[field] = 2**40
    if field == "max_seq_len":
        d["max_position_embeddings"] = 2**40
    started = time.perf_counter()
    for backend in BACKENDS:
        ellm.set_backend(backend)
        try:
            with pytest.raises(MemoryError, match="bytes"):
                Transformer(ModelArgs(**d))
        finally:
            ellm.set_backend("rust" if ellm.rust_available() else "numpy")
    assert time.perf_counter() - started < 1


def test_meta_params_with_zero_sizes(tmp_path):
    for key in ("multiple_of", "n_heads", "dim"):
        p = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100, "multiple_of": 32, key: 0}
        (tmp_path / "params.json").write_text(json.dumps(p))
        with pytest.raises(ValueError, match=key):
            ModelArgs.from_config_file(tmp_path / "params.json")


def test_gguf_declaring_four_billion_layers_fails_at_once(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "layers.gguf"), "llama")
    w.add_block_count(2**32 - 1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(160)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"<t{i}>" for i in range(320)])
    w.add_tensor("token_embd.weight", np.zeros((320, 64), dtype=np.float32))
    finish(w)
    started = time.perf_counter()
    with pytest.raises(ModelFormatError, match="4294967295 layers"):
        Transformer.from_pretrained(str(tmp_path / "layers.gguf"))
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_agree_on_nan_and_keep_0d_shapes(backend):
    previous = ellm.get_backend()
    ellm.set_backend(backend)
    try:
        out = ops.softmax(np.array([[1.0, np.nan, 2.0], [0.0, 1.0, 2.0]], dtype=np.float32))
        assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
        assert ops.silu(np.float32(2.0)).shape == ()
        assert ops.quantize(np.float32(0.3), 4).shape == ()
        with pytest.raises(MemoryError, match="normal"):
            ops.normal(2**40, seed=1)
        with pytest.raises(MemoryError, match="matmul"):
            ops.matmul(np.zeros((2**20, 1), np.float32), np.zeros((1, 2**20), np.float32))
        with pytest.raises(MemoryError, match="linear"):
            ops.linear(np.zeros((2**21, 1), np.float32), np.zeros((2**20, 1), np.float32))
    finally:
        ellm.set_backend(previous)
    assert math.isnan(float(ops.softmax(np.array([np.nan], np.float32))[0]))


def write_gguf(path, arch="llama", tokens=None, merges=None, tensors=None, block_count=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if block_count is not None:
        w.add_block_count(block_count)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens if tokens is not None else ["a", "b", "ab"])
    if merges is not None:
        w.add_token_merges(merges)
    for name, t in (tensors or {"token_embd.weight": np.zeros((3, 4), np.float32)}).items():
        w.add_tensor(name, t)
    finish(w)
    return path


def test_corrupt_tokenizer_metadata_is_a_model_format_error(tmp_path):
    from ellm import Tokenizer

    path = write_gguf(tmp_path / "merges.gguf", merges=["a b", "nospace"])
    with pytest.raises(ModelFormatError, match="merges.gguf: the GGUF tokenizer metadata is corrupt"):
        Tokenizer.from_gguf(path)


def test_tokenizer_config_problems_and_chat_template_jinja(tmp_path):
    from ellm import Tokenizer
    from ellm._bundled import bundled_model_path

    Tokenizer.from_gguf(bundled_model_path())._tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ModelFormatError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ModelFormatError, match="chat_template must be a string"):
        Tokenizer.from_file(tmp_path)
    # transformers saves the template beside the config (since 2024) when the config has none
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = Tokenizer.from_file(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
    # the template's own Python errors (fuzz/hostile.py found 1/0 escaping as ZeroDivisionError)
    for template, error in (("{{ 1/0 }}", "ZeroDivisionError"), ("{{ messages[0].content + 1 }}", "TypeError"),
                            ("{{ messages[0].content.nope() }}", "no attribute 'nope'")):
        (tmp_path / "chat_template.jinja").write_text(template)
        with pytest.raises(ModelFormatError, match=f"the chat template failed.*{error}"):
            Tokenizer.from_file(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_metadata_of_hostile_gguf_headers(tmp_path):
    from ellm.metadata import generate_metadata

    good = write_gguf(tmp_path / "ok.gguf")
    raw = bytearray(open(good, "rb").read())
    # the tensor count (bytes 8..16) set to 2**60, then a dimension set to 2**62
    many = bytearray(raw)
    many[8:16] = struct.pack("<Q", 2**60)
    (tmp_path / "many.gguf").write_bytes(many)
    started = time.perf_counter()
    with pytest.raises(ModelFormatError, match="declares"):
        generate_metadata(tmp_path / "many.gguf")
    huge = bytearray(raw)
    at = huge.index(b"token_embd.weight") + len(b"token_embd.weight") + 4  # after the name and n_dims
    huge[at:at + 8] = struct.pack("<Q", 2**62)
    (tmp_path / "huge.gguf").write_bytes(huge)
    with pytest.raises(ModelFormatError, match="needs"):
        generate_metadata(tmp_path / "huge.gguf")
    name_len = bytearray(raw)
    at = name_len.index(b"token_embd.weight") - 8
    name_len[at:at + 8] = struct.pack("<Q", 2**63)
    (tmp_path / "name.gguf").write_bytes(name_len)
    with pytest.raises(ModelFormatError, match="past the end"):
        generate_metadata(tmp_path / "name.gguf")
    assert time.perf_counter() - started < 2


def test_cli_prints_one_line_for_a_hostile_file(tmp_path):
    import subprocess
    import sys

    path = write_gguf(tmp_path / "layers.gguf", block_count=2**32 - 1)
    run = subprocess.run([sys.executable, "-m", "ellm", "info", "--model", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("ellm: error:") and "Traceback" not in run.stderr


def test_non_finite_weights_in_a_file_are_named(tmp_path, folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][1, 2] = np.inf
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="layers.0.mlp.up_proj.weight"):
        Transformer.from_pretrained(folder)
    assert Transformer.from_pretrained(folder, allow_non_finite=True).weights_loaded


def test_gguf_fields_that_break_the_config_name_the_file(tmp_path):
    path = convert(TINY, str(tmp_path / "ok.gguf"))
    raw = bytearray(open(path, "rb").read())
    key = b"llama.attention.head_count"
    at = raw.index(key + b"\x04") + len(key)  # then the value type (u32 = 4) and the value
    raw[at + 4:at + 8] = struct.pack("<I", 0)
    (tmp_path / "heads.gguf").write_bytes(raw)
    with pytest.raises(ModelFormatError, match="heads.gguf: num_attention_heads"):
        Transformer.from_pretrained(str(tmp_path / "heads.gguf"))


def test_the_loader_refuses_a_hostile_gguf_header_at_once(tmp_path):
    raw = bytearray(open(write_gguf(tmp_path / "ok.gguf"), "rb").read())
    raw[16:24] = struct.pack("<Q", 2**60)  # the key/value count
    (tmp_path / "kv.gguf").write_bytes(raw)
    started = time.perf_counter()
    with pytest.raises(ModelFormatError, match="declares"):
        Transformer.from_pretrained(str(tmp_path / "kv.gguf"))
    assert time.perf_counter() - started < 1


def test_the_engine_takes_its_tensor_list_from_model_args_and_refuses_names_it_cannot_hold():
    from ellm._backend import require_rust

    engine_class = require_rust().LlamaEngine
    args = ModelArgs.from_config_file(TINY)
    config = args.engine_config()
    assert dict((n, tuple(s)) for n, s in config["tensors"]) == args.expected_shapes()
    for bad, match in (([("model.layers.0.self_attn.rotary.weight", [8])], "no place"),
                       ([("model.layers.0.mlp.up_proj.weight", [160])], "2 dimensions")):
        with pytest.raises(ValueError, match=match):
            engine_class({**config, "tensors": config["tensors"] + bad})
