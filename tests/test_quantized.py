"""Quantized weights end to end: llama.cpp's block formats read (Rust reader, NumPy twin),
multiplied as stored, and checked against the same file expanded to float32."""

import json
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hf_to_gguf import convert

import ellm
from conftest import DATA, load_on
from ellm import ModelFormatError, Transformer
from ellm.numpy_backend.quants import BLOCKS, dequantize

TINY = os.path.join(DATA, "archs", "llama")
KINDS = list(BLOCKS)
# where each format keeps its f16 fields (d, then m / dmin), and a scale that keeps weights near 0.05
HALVES = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
          "Q6_K": [208]}
SCALE = {"Q4_0": 6e-3, "Q4_1": 4e-3, "Q5_0": 3e-3, "Q5_1": 2e-3, "Q8_0": 4e-4, "Q4_K": 6e-5, "Q5_K": 3e-5,
         "Q6_K": 1.5e-5}


def random_blocks(kind: str, rows: int, cols: int, seed: int, special: bool = False) -> np.ndarray:
    """Valid blocks of `kind` as bytes `[rows, row_bytes]`. `special` mixes in d = 0, negative
    and huge scales, and -128 in Q8_0."""
    elems, size = BLOCKS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // elems, size), dtype=np.uint8)
    for i, at in enumerate(HALVES[kind]):
        scale = SCALE[kind] * (1.0 if i == 0 else -4.0)  # mins are subtracted: negative m, positive dmin
        values = (rng.uniform(0.5, 1.5, len(raw)) * scale).astype(np.float16)
        if special:
            values[::7], values[2::7] = 0, 65504
            values[1::7] = -values[1::7]
        raw[:, at:at + 2] = values.view(np.uint8).reshape(-1, 2)
    if kind == "Q8_0" and special:
        raw[::3, 2] = 0x80  # -128
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_dequantizers_agree_with_gguf(kind):
    elems, _ = BLOCKS[kind]
    raw = random_blocks(kind, 16, 4 * elems, seed=1, special=True)
    want = gguf.quants.dequantize(raw.reshape(-1), T[kind]).reshape(16, -1)
    got = dequantize(raw, kind, (16, 4 * elems))
    np.testing.assert_array_equal(got, want)


def write_gguf(path, tensors=None, raw=None):
    """A GGUF file of named tensors: float32 arrays and `raw` blocks {name: (bytes, type)}."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (blocks, kind) in (raw or {}).items():
        w.add_tensor(name, blocks, raw_dtype=kind)
    for name, t in (tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_the_rust_reader_dequantizes_every_type_as_gguf_does(tmp_path):
    lowlevel = ellm._backend.require_rust()
    raw = {f"t.{k}": (random_blocks(k, 8, 512, seed=i, special=True), T[k]) for i, k in enumerate(KINDS)}
    halves = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    raw["t.F16"] = (halves.astype(np.float16).view(np.uint8), T.F16)
    raw["t.BF16"] = ((halves.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), T.BF16)
    path = write_gguf(tmp_path / "types.gguf", {"t.F32": halves}, raw)
    reader = lowlevel.GgufReader(path)
    listed = {name: (shape, kind) for name, shape, kind, _ in reader.tensors()}
    for name, t in ((t.name, t) for t in gguf.GGUFReader(path).tensors):
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(listed[name][0])
        assert listed[name][1] == t.tensor_type.name
        np.testing.assert_array_equal(reader.read(name), want, err_msg=name)


def config(hidden=256, inter=512, layers=3, vocab=512):
    with open(os.path.join(TINY, "config.json"), encoding="utf-8") as fh:
        c = json.load(fh)
    c.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    return c


def shapes():
    return ellm.ModelArgs.from_dict(config()).expected_shapes()


def block_model(tmp_path, kinds=KINDS, replace=None):
    """A small Llama whose every matrix is random blocks, the types taken in turn from `kinds`
    (so each type sits in q/k/v, o, gate/up, down or the head somewhere), norms near 1;
    `replace` gives some matrices as other stored bytes ({name: (bytes, type)})."""
    raw, tensors = {}, {}
    matrices = [(n, s) for n, s in shapes().items() if len(s) == 2]
    for i, (name, (rows, cols)) in enumerate(matrices):
        kind = kinds[i % len(kinds)]
        raw[name] = (random_blocks(kind, rows, cols, seed=i), T[kind])
    raw.update(replace or {})
    rng = np.random.default_rng(5)
    for name, shape in shapes().items():
        if len(shape) == 1:
            tensors[name] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    return convert(config(), str(tmp_path / "blocks.gguf"), tensors=tensors, raw=raw)


PROMPT = [[3, 17, 200, 45, 9, 311, 77, 8, 150, 42, 5, 260]]


def test_every_block_type_runs_as_stored_and_matches_its_f32_expansion(tmp_path):
    ellm._backend.require_rust()
    path = block_model(tmp_path)
    stored = load_on("rust", path)
    expanded = load_on("rust", path, dtype="f32")
    kept = set(stored.weight_types().values())
    assert kept == set(KINDS), kept
    assert set(expanded.weight_types().values()) == {"F32"}
    want = expanded.forward(PROMPT)
    got = stored.forward(PROMPT)
    # two-digit activations: every value within d/256 of x, so the logits sit within a few 1e-3
    # of the expansion's (here |logits| ~ 3)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max(), np.abs(got - want).max()
    numpy_model = load_on("numpy", path)
    np.testing.assert_allclose(numpy_model.forward(PROMPT), want, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("path_name", ["avx512vnni", "avxvnni", "avx2", "portable"])
def test_every_dot_path_gives_the_same_logits(tmp_path, path_name):
    lowlevel = ellm._backend.require_rust()
    if path_name not in lowlevel.quant_paths():
        pytest.skip(f"this CPU cannot run the {path_name} kernels")
    model = load_on("rust", block_model(tmp_path))
    reference = model.forward(PROMPT)
    try:
        lowlevel.set_quant_path(path_name)
        assert lowlevel.quant_path() == path_name
        model.reset_cache()
        got = model.forward(PROMPT)
    finally:
        lowlevel.set_quant_path(None)
    # the same integer sums on every path; only the float order of the scaled sums differs
    np.testing.assert_allclose(got, reference, atol=5e-5 * np.abs(reference).max())


def test_forcing_a_path_this_cpu_lacks_or_an_unknown_one_is_refused():
    lowlevel = ellm._backend.require_rust()
    with pytest.raises(ValueError, match='unknown quantized path "sse9"'):
        lowlevel.set_quant_path("sse9")
    assert "portable" in lowlevel.quant_paths()


def greedy(model, ids, n):
    out, _ = model.generate([ids], max_gen_len=n, temperature=0, stop_tokens=[2])
    return out[0]


def assert_stored_matches_expanded(path, cases, golden):
    """The file as stored against its f32 expansion: with an f32 KV cache (the weights and
    activations alone) logits within 0.05 (|logits| ~ 30), and as loaded by default (an f16 cache,
    whose rounding of keys and values adds up to about 0.1 over the layers) within 0.15; greedy
    continuations identical both ways."""
    expanded = load_on("rust", path, dtype="f32", max_seq_len=512)
    assert expanded.model_args.kv_cache_dtype == "f32"
    stored = load_on("rust", path, max_seq_len=512, kv_cache_dtype="f32")
    default = load_on("rust", path, max_seq_len=512)
    assert default.model_args.kv_cache_dtype == "f16"
    for i in cases:
        ids = golden[f"case{i}_input_ids"].tolist()
        want = expanded.forward([ids])
        n = len(golden[f"case{i}_greedy_ids"])
        continuation = greedy(expanded, ids, n)
        for model, bound in ((stored, 0.05), (default, 0.15)):
            got = model.forward([ids])
            what = f"case {i}, {model.model_args.kv_cache_dtype} cache"
            assert np.abs(got - want).max() < bound, f"{what}: {np.abs(got - want).max()}"
            assert greedy(model, ids, n) == continuation, what
    return stored


def test_the_bundled_q4_1_file_as_stored_matches_its_f32_expansion(gguf_path, golden):
    ellm._backend.require_rust()
    stored = assert_stored_matches_expanded(gguf_path, range(4), golden)
    assert set(stored.weight_types().values()) == {"Q4_1", "Q8_0"}


@pytest.fixture(scope="module")
def bundled_tensors(gguf_path):
    """The bundled model's tensors as float32 under Hugging Face names, and its config."""
    from ellm.weights import open_checkpoint

    ckpt = open_checkpoint(gguf_path)
    with open(os.path.join(DATA, "smollm2_hf_config.json"), encoding="utf-8") as fh:
        c = json.load(fh)
    return c, {n: ckpt.load(n) for n in ckpt.args.expected_shapes()}


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_files_requantized_from_the_f32_weights_match_their_expansion(tmp_path, bundled_tensors, golden, kind):
    ellm._backend.require_rust()
    c, tensors = bundled_tensors
    path = convert(c, str(tmp_path / f"{kind}.gguf"), qtype=T[kind], tensors=tensors)
    stored = assert_stored_matches_expanded(path, (0, 2), golden)
    assert set(stored.weight_types().values()) == {kind}


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantizing_on_load_gives_llama_cpps_blocks(tmp_path, bundled_tensors, kind):
    """dtype="q8_0"/"q4_0" on an f32 file makes the blocks gguf's (llama.cpp's) quantizer makes."""
    ellm._backend.require_rust()
    c, tensors = bundled_tensors
    c = {**c, "num_hidden_layers": 2}
    tensors = {n: t for n, t in tensors.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    f32_file = convert(c, str(tmp_path / "f32.gguf"), tensors=tensors)
    by_gguf = convert(c, str(tmp_path / "q.gguf"), qtype=T[kind.upper()], tensors=tensors)
    on_load = load_on("rust", f32_file, dtype=kind)
    assert set(on_load.weight_types().values()) == {kind.upper()}
    reference = load_on("rust", by_gguf)
    np.testing.assert_array_equal(on_load.forward(PROMPT), reference.forward(PROMPT))


def save_bf16(tensors: dict, path: str) -> None:
    """A safetensors file of bfloat16 tensors given as their uint16 bits (NumPy has no bfloat16)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        for t in tensors.values():
            fh.write(np.ascontiguousarray(t).tobytes())


@pytest.mark.parametrize("half", ["F16", "BF16"])
def test_a_half_precision_folder_is_kept_as_stored(tmp_path, half):
    ellm._backend.require_rust()
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / half
    folder.mkdir()
    state = load_file(os.path.join(TINY, "model.safetensors"))
    if half == "F16":
        save_file({n: t.astype(np.float16) for n, t in state.items()}, str(folder / "model.safetensors"))
    else:
        save_bf16({n: (t.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for n, t in state.items()},
                  str(folder / "model.safetensors"))
    (folder / "config.json").write_text(open(os.path.join(TINY, "config.json")).read())
    kept = load_on("rust", str(folder))
    assert set(kept.weight_types().values()) == {half}
    reference = load_on("rust", str(folder), dtype="f32")
    assert set(reference.weight_types().values()) == {"F32"}
    want = reference.forward(PROMPT)
    np.testing.assert_allclose(kept.forward(PROMPT), want, atol=1e-4 * np.abs(want).max())


def test_an_unsupported_block_type_names_the_tensor_and_the_type(tmp_path):
    ellm._backend.require_rust()
    target = "model.layers.1.mlp.up_proj.weight"
    rows, cols = shapes()[target]
    path = block_model(tmp_path, ["Q4_0"], {target: (np.zeros((rows, cols // 256 * 84), np.uint8), T.Q2_K)})
    with pytest.raises(ModelFormatError, match=r"blk\.1\.ffn_up\.weight has type Q2_K, which ellm does not support"):
        Transformer.from_pretrained(path)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "F16"])
def test_a_block_with_an_infinite_scale_is_refused_by_name_unless_allowed(tmp_path, kind):
    ellm._backend.require_rust()
    target = "model.layers.2.mlp.gate_proj.weight"
    rows, cols = shapes()[target]
    if kind == "F16":
        values = np.full((rows, cols), 0.01, np.float16)
        values[3, 7] = np.inf
        stored = (values.view(np.uint8), T.F16)
    else:
        blocks = random_blocks(kind, rows, cols, seed=99)
        blocks[5, 0:2] = np.array([np.inf], np.float16).view(np.uint8)  # d of a block of row 5
        stored = (blocks, T[kind])
    path = block_model(tmp_path, ["Q4_0"], {target: stored})
    with pytest.raises(ModelFormatError, match=r"blk\.2\.ffn_gate\.weight.* NaN or infinite.*allow_non_finite"):
        load_on("rust", path)
    assert load_on("rust", path, allow_non_finite=True).weights_loaded


def test_an_unknown_type_number_is_a_format_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", {"w": np.ones((2, 32), np.float32)})
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b"w") + 1 + 4 + 16  # after the name: n_dims (u32) and two u64 dims, the type
    assert int.from_bytes(raw[at:at + 4], "little") == 0
    raw[at:at + 4] = (77).to_bytes(4, "little")
    (tmp_path / "t.gguf").write_bytes(raw)
    with pytest.raises(ModelFormatError, match="77"):
        ellm.metadata.generate_metadata(str(tmp_path / "t.gguf")) if not ellm.rust_available() else \
            ellm._lowlevel.GgufReader(str(tmp_path / "t.gguf"))


@pytest.mark.parametrize("backend_name", ["rust", "numpy"])
def test_truncation_anywhere_is_a_clear_error(tmp_path, backend_name):
    if backend_name == "rust":
        ellm._backend.require_rust()
    path = block_model(tmp_path, kinds=["Q4_0", "Q8_0"])
    data = open(path, "rb").read()
    header_end = data.index(b"blk.0.attn_q.weight") + 40
    cuts = sorted({4, 12, 30, 200, 1000, header_end - 20, header_end + 5, len(data) // 2, len(data) - 1})
    for cut in cuts:
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            load_on(backend_name, str(tmp_path / "cut.gguf"))


def test_a_dtype_ellm_does_not_keep_is_refused(gguf_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        Transformer.from_pretrained(gguf_path, dtype="int3")


def test_the_command_line_says_what_it_loads(gguf_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ellm", "generate", "Hi", "--max-tokens", "1"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("ellm: loading SmolLM2-135M-Instruct.Q4_1.gguf (94 MB), weights as stored ...")
