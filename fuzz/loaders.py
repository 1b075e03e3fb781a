"""Fuzz targets for the Python loaders: the safetensors header parser, `ModelArgs.from_config_file`,
the tokenizer / chat-template loaders and `Transformer.from_pretrained` on GGUF bytes.

Each target takes bytes and may raise only the errors ellm promises for bad input
(`ModelFormatError`, `ValueError`, `TypeError`, `MemoryError`, `OSError`); anything else, a
crash or a hang is a finding.

    python fuzz/loaders.py TARGET [-runs=N] [libFuzzer options]   # coverage-guided, with atheris
    python fuzz/loaders.py --replay TARGET N                      # N seeded mutations, no atheris

`tests/test_fuzz_regression.py` replays the seeds and a few thousand mutations in CI.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import tempfile
import warnings

ALLOWED = (ValueError, TypeError, MemoryError, OSError)  # ModelFormatError is a ValueError
HERE = os.path.dirname(os.path.abspath(__file__))
_SCRATCH = tempfile.mkdtemp(prefix="ellm-fuzz-")
warnings.simplefilter("ignore")  # a fuzzed file may warn (overflow in a sum); only errors matter


def _write(name: str, data: bytes) -> str:
    path = os.path.join(_SCRATCH, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def safetensors_header(data: bytes) -> None:
    from ellm.weights.safetensors import read_header

    read_header(_write("model.safetensors", data))


def config(data: bytes) -> None:
    from ellm import ModelArgs

    args = ModelArgs.from_config_file(_write("config.json", data))
    args.validate()
    args.expected_shapes()


def tokenizer(data: bytes) -> None:
    """The first half of the bytes as tokenizer.json, the rest as tokenizer_config.json (which
    carries the chat template); then encode, decode and render a chat."""
    from ellm import Tokenizer

    cut = len(data) // 2
    folder = os.path.join(_SCRATCH, "tok")
    os.makedirs(folder, exist_ok=True)
    for name, part in (("tokenizer.json", data[:cut]), ("tokenizer_config.json", data[cut:])):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(part)
    tok = Tokenizer.from_file(folder)
    ids = tok.encode("Hello <|im_start|> 12 world")
    tok.decode(ids)
    if tok.chat_template:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def gguf_model(data: bytes) -> None:
    from ellm import Transformer

    model = Transformer.from_pretrained(_write("model.gguf", data), max_seq_len=16)
    model.forward([[0]])


TARGETS = {"safetensors_header": safetensors_header, "config": config, "tokenizer": tokenizer,
           "gguf_model": gguf_model}


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from, made here (the repository holds no binary files)."""
    if target == "safetensors_header":
        header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                             "__metadata__": {"format": "pt"}}).encode()
        return [struct.pack("<Q", len(header)) + header + bytes(16)]
    if target == "config":
        with open(os.path.join(HERE, "..", "tests", "data", "smollm2_hf_config.json"), "rb") as fh:
            return [fh.read()]
    if target == "tokenizer":
        vocab = {"<|im_start|>": 0, "<|im_end|>": 1, "H": 2, "e": 3, "l": 4, "o": 5, "Ġ": 6, "w": 7, "r": 8, "d": 9,
                 "lo": 10, "He": 11}
        tok = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": ["l o", "H e"]},
               "added_tokens": [{"id": 0, "content": "<|im_start|>", "special": True, "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False}],
               "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": True},
               "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}
        cfg = {"eos_token": "<|im_end|>",
               "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}
        a, b = json.dumps(tok).encode(), json.dumps(cfg).encode()
        width = max(len(a), len(b))  # halves of equal length (JSON allows trailing spaces)
        return [a.ljust(width) + b.ljust(width)]
    if target == "gguf_model":
        return [_tiny_gguf()]
    raise KeyError(target)


def _tiny_gguf() -> bytes:
    """A complete two-layer Llama in a few kilobytes (hidden 32, Q8_0 and F32 tensors)."""
    import gguf
    import numpy as np

    path = os.path.join(_SCRATCH, "seed.gguf")
    w = gguf.GGUFWriter(path, "llama")
    hidden, inter, vocab, heads = 32, 64, 16, 2
    for key, value in (("block_count", 2), ("context_length", 64), ("embedding_length", hidden),
                       ("feed_forward_length", inter), ("attention.head_count", heads),
                       ("attention.head_count_kv", heads), ("vocab_size", vocab)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    rng = np.random.default_rng(0)

    def matrix(name, rows, cols, q8=True):
        t = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        if q8:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)

    matrix("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(2):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", hidden, hidden), ("attn_v", hidden, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", inter, hidden),
                                 ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            matrix(f"blk.{i}.{name}.weight", rows, cols, q8=(i == 0))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as fh:
        return fh.read()


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(b) + 1)
        kind = rng.randrange(6)
        if kind == 0:
            del b[at:]
        elif kind == 1 and at < len(b):
            b[at] ^= 1 << rng.randrange(8)
        elif kind == 2:
            b[at:at + rng.randint(1, 8)] = bytes([rng.choice((0, 0xFF))]) * rng.randint(1, 8)
        elif kind == 3:
            other = rng.choice(corpus)
            b[at:] = other[rng.randrange(len(other) + 1):]
        elif kind == 4:
            b[at:at] = b[at:at + rng.randint(1, 32)]
        elif at < len(b):
            b[at] = rng.randrange(256)
    return bytes(b)


def run_one(target, data: bytes) -> None:
    try:
        target(data)
    except ALLOWED:
        pass


def replay(name: str, count: int, seed: int = 0) -> int:
    """Every seed, then `count` mutations of them, through the target; returns how many ran."""
    target, corpus = TARGETS[name], seeds(name)
    rng = random.Random(seed)
    for s in corpus:
        target(s)  # a seed must load
    for _ in range(count):
        run_one(target, mutate(rng, rng.choice(corpus), corpus))
    return count


def main() -> None:
    if sys.argv[1:2] == ["--replay"]:
        name, count = sys.argv[2], int(sys.argv[3])
        print(f"{name}: {replay(name, count)} inputs, no crash")
        return
    import atheris

    name = sys.argv[1]
    with atheris.instrument_imports():
        import ellm  # noqa: F401
        import ellm.weights.safetensors  # noqa: F401
        import ellm.tokenizer  # noqa: F401
        import ellm.weights.gguf  # noqa: F401
    target = TARGETS[name]
    corpus_dir = os.path.join(_SCRATCH, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    for i, s in enumerate(seeds(name)):
        with open(os.path.join(corpus_dir, f"seed{i}"), "wb") as fh:
            fh.write(s)
    atheris.Setup([sys.argv[0], *sys.argv[2:], corpus_dir], lambda data: run_one(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
