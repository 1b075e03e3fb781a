"""Llama-family architectures (llama, mistral, qwen2, qwen3) against Hugging Face transformers'
outputs of tiny random models (tests/data/archs, see its README), from their folders and from
GGUF files written as llama.cpp's converter writes them, on both backends."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ellm
from ellm import HookRegistry, ModelArgs, Transformer
from ellm.errors import ModelFormatError
from ellm.weights import open_checkpoint

from conftest import BACKENDS, DATA, load_on
from hf_to_gguf import convert, finish

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
ARCHS = os.path.join(DATA, "archs")
EOS = 2


def folder(family):
    return os.path.join(ARCHS, family)


def golden(family):
    return np.load(os.path.join(folder(family), "golden.npz"))


def config(family):
    with open(os.path.join(folder(family), "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def load(path, backend):
    return load_on(backend, path)


def cut_at_eos(row):
    """transformers pads a row with 0 after its eos id; generate stops before it."""
    row = list(row)
    return row[:row.index(EOS)] if EOS in row else row


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("archs")
    return {f: convert(folder(f), str(out / f"{f}.gguf")) for f in FAMILIES}


def check_golden(model, gold):
    logits = model.forward(gold["input_ids"])
    assert logits.shape == gold["logits"].shape
    assert np.abs(logits - gold["logits"]).max() < 1e-4
    tokens, _ = model.generate(gold["input_ids"].tolist(), gold["greedy_ids"].shape[1], temperature=0)
    assert tokens == [cut_at_eos(row) for row in gold["greedy_ids"].tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_matches_transformers(family, backend):
    model = load(folder(family), backend)
    assert model.model_args.model_type == family
    check_golden(model, golden(family))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_transformers(family, backend, gguf_files):
    model = load(gguf_files[family], backend)
    check_golden(model, golden(family))


def test_family_switches_follow_transformers():
    """What each family's modeling code does with the same config keys."""
    qwen2, qwen3, mistral, llama = (ModelArgs.from_config_file(folder(f))
                                    for f in ("qwen2", "qwen3", "mistral", "llama"))
    assert "attention_bias" not in config("qwen2")
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    assert (qwen3.qkv_bias, qwen3.o_proj_bias, qwen3.qk_norm) == (False, False, True)
    assert qwen3.resolved_head_dim == 24 and qwen3.q_dim() == 96 != qwen3.hidden_size
    assert (llama.qkv_bias, llama.o_proj_bias) == (True, True)
    assert llama.rope_scaling["rope_type"] == "llama3"
    assert (mistral.qkv_bias, mistral.o_proj_bias, mistral.layer_windows()) == (False, False, [0, 0])
    # transformers' defaults for keys a config leaves out
    assert ModelArgs.from_dict({"model_type": "mistral"}).layer_windows() == [4096] * 32
    assert ModelArgs.from_dict({"model_type": "qwen3"}).resolved_head_dim == 128
    qwen = ModelArgs.from_dict({"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True,
                                "sliding_window": 16, "max_window_layers": 2})
    assert qwen.layer_windows() == [0, 0, 16, 16]
    assert ModelArgs.from_dict({"model_type": "qwen2", "sliding_window": 16}).layer_windows() == [0] * 32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_matches_transformers(family, backend):
    """A window shorter than the 12-token prompt (mistral: 4 on every layer; qwen2: 5 on layer 1)."""
    ref = np.load(os.path.join(ARCHS, "sliding.npz"))
    d = config(family)
    d.update(json.loads(str(ref[f"{family}_config"])))
    if family == "qwen2":
        del d["layer_types"]  # derived from max_window_layers, as transformers derives it
    args = ModelArgs.from_dict(d)
    assert max(args.layer_windows()) < golden(family)["input_ids"].shape[1]
    previous = ellm.get_backend()
    ellm.set_backend(backend)
    try:
        model = Transformer(args)
    finally:
        ellm.set_backend(previous)
    model.load_state_dict(load_file(os.path.join(folder(family), "model.safetensors")))
    ids = golden(family)["input_ids"]
    logits = model.forward(ids)
    assert np.abs(logits - ref[f"{family}_logits"]).max() < 1e-4
    assert np.abs(logits - golden(family)["logits"]).max() > 1e-2  # the window changed the answer
    # decode, one token at a time past the window, reads the cache through the window too
    tokens, _ = model.generate(ids.tolist(), 8, temperature=0)
    assert tokens == [cut_at_eos(r) for r in ref[f"{family}_greedy_ids"].tolist()]


def test_gguf_sliding_window_key_applies_to_every_layer(tmp_path):
    ref = np.load(os.path.join(ARCHS, "sliding.npz"))
    assert json.loads(str(ref["mistral_config"])) == {"sliding_window": 4}
    path = convert(folder("mistral"), str(tmp_path / "swa.gguf"), sliding_window=4)
    model = load(path, "rust")
    assert model.model_args.layer_windows() == [4, 4]
    logits = model.forward(golden("mistral")["input_ids"])
    assert np.abs(logits - ref["mistral_logits"]).max() < 1e-4


def test_ops_attention_window_matches_a_masked_reference():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((n, h, 8)).astype(np.float32) for n, h in ((20, 4), (26, 2), (26, 2)))
    for backend in BACKENDS:
        ellm.set_backend(backend)
        try:
            for window in (1, 3, 40):
                got = ellm.ops.attention(q, k, v, start_pos=6, window=window)
                for i in range(20):
                    pos = 6 + i
                    lo = max(0, pos + 1 - window)
                    want = ellm.ops.attention(q[i:i + 1], k[lo:pos + 1], v[lo:pos + 1], causal=False)
                    assert np.abs(got[i] - want[0]).max() < 1e-5, (backend, window, i)
            with pytest.raises(ValueError, match="window"):
                ellm.ops.attention(q, k, v, window=0)
        finally:
            ellm.set_backend("rust" if ellm.rust_available() else "numpy")


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_of_every_family(family, tmp_path):
    """A Q8_0 file of each family, quantized by the gguf package's llama.cpp-compatible quantizer:
    logits near the f32 ones (8-bit weights of std 0.08 move these logits by about 1%)."""
    path = convert(folder(family), str(tmp_path / "q8.gguf"), gguf.GGMLQuantizationType.Q8_0)
    assert open_checkpoint(path).tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "Q8_0"
    gold = golden(family)
    logits = load(path, "rust").forward(gold["input_ids"])
    err = np.abs(logits - gold["logits"]).max()
    assert 1e-6 < err < 0.02 * np.abs(gold["logits"]).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_points_fire_alike_on_both_backends(family):
    seen = {}
    for backend in BACKENDS:
        registry = HookRegistry()
        got = seen.setdefault(backend, {})
        registry.register_hook("*", lambda name, t, layer, got=got: got.setdefault(name, t.copy()))
        model = load(folder(family), backend)
        model.set_hook_registry(registry)
        model.forward(golden(family)["input_ids"])
        assert sorted(got) == sorted(model.hook_points())
    for name, tensor in seen["numpy"].items():
        assert seen["rust"][name].shape == tensor.shape
        assert np.abs(seen["rust"][name] - tensor).max() < 1e-4, name


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_counts_every_parameter(family):
    tensors = load_file(os.path.join(folder(family), "model.safetensors"))
    meta = ellm.metadata.generate_metadata(folder(family))
    assert meta.totals["params"] == sum(t.size for t in tensors.values())
    assert meta.totals["params"] == ModelArgs.from_config_file(folder(family)).num_parameters()


def copy_family(family, tmp_path):
    out = tmp_path / family
    shutil.copytree(folder(family), out)
    return out


def rewrite_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def test_unknown_model_type_is_refused(tmp_path):
    path = copy_family("llama", tmp_path)
    rewrite_config(path, model_type="gemma2")
    with pytest.raises(ModelFormatError, match="gemma2"):
        Transformer.from_pretrained(path)


@pytest.mark.parametrize("switch, value", [("partial_rotary_factor", 0.5), ("num_local_experts", 8),
                                           ("final_logit_softcapping", 30.0)])
def test_switches_ellm_does_not_implement_are_refused(tmp_path, switch, value):
    path = copy_family("qwen2", tmp_path)
    rewrite_config(path, **{switch: value})
    with pytest.raises(ModelFormatError, match=switch):
        Transformer.from_pretrained(path)


def test_unknown_layer_type_is_refused(tmp_path):
    path = copy_family("qwen3", tmp_path)
    rewrite_config(path, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ModelFormatError, match="chunked_attention"):
        Transformer.from_pretrained(path)


def test_tensors_ellm_has_no_place_for_are_refused(tmp_path):
    """A Qwen3 checkpoint read as Llama would silently drop its q/k norms."""
    path = copy_family("qwen3", tmp_path)
    rewrite_config(path, model_type="llama")
    with pytest.raises(ModelFormatError, match="q_norm"):
        Transformer.from_pretrained(path)
    path = copy_family("mistral", tmp_path / "extra")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, dtype=np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="q_proj.bias"):
        Transformer.from_pretrained(path)


def test_missing_family_tensors_are_named(tmp_path):
    path = copy_family("qwen2", tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="layers.1.self_attn.k_proj.bias"):
        Transformer.from_pretrained(path)


def test_gguf_refusals(tmp_path):
    extra = {"blk.0.attn_gate.weight": np.zeros((4, 64), dtype=np.float32)}
    path = convert(folder("qwen3"), str(tmp_path / "extra.gguf"), extra_tensors=extra)
    with pytest.raises(ModelFormatError, match="attn_gate"):
        Transformer.from_pretrained(path)
    w = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    finish(w)
    with pytest.raises(ModelFormatError, match="phi3"):
        Transformer.from_pretrained(str(tmp_path / "phi3.gguf"))


def test_qwen2_pre_tokenizer_splits_digits_one_by_one():
    from ellm.tokenizer import _byte_level_pre_tokenizer

    def pieces(pre):
        return [p for p, _ in _byte_level_pre_tokenizer(pre).pre_tokenize_str("abc 12345 don't")]

    assert pieces("qwen2") == ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġdon", "'t"]
    assert pieces("llama-bpe") == ["abc", "Ġ", "123", "45", "Ġdon", "'t"]
