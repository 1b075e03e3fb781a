"""The engine against Hugging Face's golden outputs for the bundled model, on both backends."""

import numpy as np
import pytest

import ellm
from ellm import ModelArgs, Transformer
from ellm.errors import ModelFormatError

from conftest import BACKENDS, build

CASES = range(4)


@pytest.mark.parametrize("b", BACKENDS)
def test_logits_match_golden(models, golden, b):
    for i in CASES:
        ids = golden[f"case{i}_input_ids"]
        logits = models[b].forward([ids.tolist()])[0]
        assert logits.shape == (len(ids), 49152) and logits.dtype == np.float32
        assert np.abs(logits[-1] - golden[f"case{i}_logits_last"]).max() < 1e-3
        top = np.take_along_axis(logits, golden[f"case{i}_top64_ids"], axis=-1)
        assert np.abs(top - golden[f"case{i}_top64_logits"]).max() < 1e-3


@pytest.mark.parametrize("b", BACKENDS)
def test_greedy_ids_match_golden(models, golden, b):
    for i in CASES:
        gold = golden[f"case{i}_greedy_ids"].tolist()
        tokens, logprobs = models[b].generate([golden[f"case{i}_input_ids"].tolist()], len(gold), temperature=0)
        assert logprobs is None
        expect = gold[:-1] if gold[-1] == 2 else gold  # generation is cut at the eos id
        assert tokens[0] == expect


@pytest.mark.parametrize("b", BACKENDS)
def test_prefill_then_decode_equals_one_forward(models, golden, b):
    m = models[b]
    ids = golden["case1_input_ids"].tolist()
    full = m.forward([ids])[0]
    n = len(ids) - 3
    parts = [m.forward([ids[:n]], 0)[0]] + [m.forward([[t]], n + j)[0] for j, t in enumerate(ids[n:])]
    assert np.abs(np.concatenate(parts) - full).max() < 1e-3


def test_ragged_batch_gives_the_same_greedy_ids(models, golden):
    m = models["rust"]
    prompts = [golden[f"case{i}_input_ids"].tolist() for i in CASES]
    batched, _ = m.generate(prompts, 16, temperature=0)
    for i, p in enumerate(prompts):
        single, _ = m.generate([p], 16, temperature=0)
        assert batched[i] == single[0]


def test_logprobs_and_echo(models, golden):
    m = models["rust"]
    ids = golden["case0_input_ids"].tolist()
    tokens, logprobs = m.generate([ids], 4, temperature=0, logprobs=True, echo=True)
    assert tokens[0][:len(ids)] == ids and len(logprobs[0]) == len(tokens[0])
    logits = m.forward([tokens[0]])[0].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expect = logits[np.arange(len(ids) - 1), tokens[0][1:len(ids)]] - lse[:len(ids) - 1]
    np.testing.assert_allclose(logprobs[0][1:len(ids)], expect, atol=1e-3)


def test_seeded_sampling_is_reproducible(models, golden):
    m = models["rust"]
    p = [golden["case0_input_ids"].tolist()]
    a = m.generate(p, 12, temperature=1.0, top_p=0.95, seed=5)[0]
    assert m.generate(p, 12, temperature=1.0, top_p=0.95, seed=5)[0] == a
    assert any(m.generate(p, 12, temperature=1.0, top_p=0.95, seed=s)[0] != a for s in (6, 7, 8))


def test_safetensors_folder_gives_the_same_logits(tmp_path, checkpoint, state_dict, models, golden):
    import json

    from safetensors.numpy import save_file

    folder = tmp_path / "smollm2"
    folder.mkdir()
    half = len(state_dict) // 2
    names = list(state_dict)
    save_file({n: state_dict[n] for n in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    # the second shard in bf16-free f16 would lose precision; keep f32 and exercise the index
    save_file({n: state_dict[n] for n in names[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(checkpoint.args.to_dict()))
    m = Transformer.from_pretrained(folder)
    ids = [golden["case3_input_ids"].tolist()]
    # The same weights at other addresses: the product kernels start their vector steps at the
    # weights' cache-line boundary (as BLAS kernels do), so sums round in another order.
    diff = np.abs(m.forward(ids) - models["rust"].forward(ids)).max()
    assert diff < 1e-4, diff


def tiny_args():
    return ModelArgs(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False, max_position_embeddings=64,
                     rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def tiny_state(args, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in args.expected_shapes().items()}


def test_an_f16_kv_cache_rounds_alike_on_both_backends_and_stays_near_f32():
    args, sd = tiny_args(), tiny_state(tiny_args())
    tokens = np.random.default_rng(2).integers(0, 97, size=(2, 24))  # 24 rows: both attention paths
    f32 = build("numpy", args, sd).forward(tokens)
    args.kv_cache_dtype = "f16"
    models = [build(name, args, sd) for name in ("rust", "numpy")]
    rust, ref = (m.forward(tokens[:, :20]) for m in models)
    np.testing.assert_allclose(rust, ref, atol=1e-4)
    # decode steps read the cache the first 20 positions left
    np.testing.assert_allclose(models[0].forward(tokens[:, 20:], 20), models[1].forward(tokens[:, 20:], 20), atol=1e-4)
    difference = np.abs(rust - f32[:, :20]).max()
    assert 0 < difference < 5e-3, difference  # the halves round, a little
    args.kv_cache_dtype = "bf16"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'f32', 'f16', got 'bf16'"):
        ellm.Transformer(args)


def test_tiny_random_model_rust_against_numpy():
    args = tiny_args()
    sd = tiny_state(args)
    rust, ref = build("rust", args, sd), build("numpy", args, sd)
    tokens = np.random.default_rng(1).integers(0, 97, size=(3, 20))
    np.testing.assert_allclose(rust.forward(tokens), ref.forward(tokens), atol=1e-4)
    np.testing.assert_allclose(rust.forward(tokens[:, :5], 20), ref.forward(tokens[:, :5], 20), atol=1e-4)
    assert rust.generate([[1, 2, 3], [4]], 10, temperature=0) == ref.generate([[1, 2, 3], [4]], 10, temperature=0)


def test_torch_like_values_with_array_protocol():
    class FakeTensor:
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def __array__(self, dtype=None, copy=None):
            return self.a

    args = tiny_args()
    sd = tiny_state(args)
    m = Transformer(args)
    m.load_state_dict({k: FakeTensor(v) for k, v in sd.items()})
    np.testing.assert_allclose(m.forward([[1, 2]]), build("rust", args, sd).forward([[1, 2]]), atol=1e-6)


@pytest.mark.parametrize("b", BACKENDS)
def test_bad_input(b, tmp_path):
    args = tiny_args()
    sd = tiny_state(args)
    model = build(b, args, sd)
    before = model.forward([[1, 2, 3]])
    wrong = dict(sd)
    wrong["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 31), np.float32)
    with pytest.raises(ValueError, match=r"up_proj.*\(48, 31\).*\(48, 32\)"):
        model.load_state_dict(wrong)
    missing = dict(sd)
    del missing["model.norm.weight"]
    with pytest.raises(ValueError, match="missing keys: model.norm.weight"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys: extra"):
        model.load_state_dict({**sd, "extra": np.zeros(1)})
    np.testing.assert_array_equal(model.forward([[1, 2, 3]]), before)  # a failed load keeps the weights
    with pytest.raises(ValueError, match="token id 97"):
        model.forward([[1, 97]])
    with pytest.raises(ValueError, match="same length"):
        model.forward([[1, 2], [3]])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward([[1, 2]], start_pos=63)
    with pytest.raises(ValueError, match="max_batch_size"):
        model.forward([[1]] * 5)
    with pytest.raises(ValueError, match="divisible"):
        Transformer(ModelArgs(num_attention_heads=9, num_key_value_heads=2, hidden_size=576))
    with pytest.raises(ValueError, match="no weights"):
        Transformer(args).forward([[1]])


def test_truncated_files_raise_clear_errors(tmp_path, gguf_path):
    from safetensors.numpy import save_file

    args = tiny_args()
    folder = tmp_path / "tiny"
    folder.mkdir()
    save_file(tiny_state(args), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(__import__("json").dumps(args.to_dict()))
    assert Transformer.from_pretrained(folder).weights_loaded
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        Transformer.from_pretrained(folder)
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as fh:
        cut.write_bytes(fh.read(4_000_000))
    with pytest.raises(ModelFormatError, match="GGUF"):
        Transformer.from_pretrained(cut)
    with pytest.raises(FileNotFoundError):
        Transformer.from_pretrained(tmp_path / "nothing")
    assert issubclass(ModelFormatError, ValueError) and issubclass(ModelFormatError, ellm.EllmError)


def test_model_args_names(models):
    m = models["rust"]
    assert m.model_args is m.config and m.model_args.hidden_size == 576 and m.weights_loaded
    assert m.model_args.num_parameters() == 134_515_008


def write_safetensors(path, tensors, dtype):
    """A safetensors file in F16 or BF16 written by hand (NumPy has no bfloat16)."""
    import json
    import struct

    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        if dtype == "BF16":
            raw = (value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            raw = value.astype(np.float16).tobytes()
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_folders(tmp_path, dtype):
    import json

    args = tiny_args()
    sd = tiny_state(args)
    write_safetensors(tmp_path / "model.safetensors", sd, dtype)
    torch_dtype = {"F16": "float16", "BF16": "bfloat16"}[dtype]
    config = {k: v for k, v in args.to_dict().items() if k != "dtype"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": torch_dtype}))
    # an f32 cache, so only the weights' precision differs from the f32 model below
    model = Transformer.from_pretrained(tmp_path, kv_cache_dtype="f32")
    # what "auto" picks: f16 where the Rust engine keeps the weights in halves; the NumPy backend computes in f32
    auto = Transformer.from_pretrained(tmp_path).model_args.kv_cache_dtype
    assert auto == ("f16" if ellm.get_backend() == "rust" else "f32")
    # the same weights rounded to the stored precision, loaded as f32 arrays
    if dtype == "BF16":
        rounded = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in sd.items()}
    else:
        rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}
    tokens = [[1, 5, 9, 2]]
    np.testing.assert_allclose(model.forward(tokens), build("rust", args, rounded).forward(tokens), atol=1e-5)
    assert model.model_args.dtype == torch_dtype


def test_other_gguf_architectures_are_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="'gpt2'"):
        Transformer.from_pretrained(tmp_path / "gpt2.gguf")


@pytest.mark.parametrize("b", BACKENDS)
def test_reset_cache_and_cache_positions(b):
    args = tiny_args()
    model = build(b, args, tiny_state(args))
    full = model.forward([[3, 4, 5, 6]])
    model.forward([[3, 4, 5]], 0)
    model.reset_cache()
    # after a reset the slot holds nothing, so decoding at position 3 would read positions never written
    with pytest.raises(ValueError, match="slot 0 holds 0 positions.*never written"):
        model.forward([[6]], 3)
    model.forward([[3, 4, 5]], 0)
    np.testing.assert_allclose(model.forward([[6]], 3)[0, 0], full[0, 3], atol=1e-4)
