"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, built from a tokenizer.json or from
a GGUF file's metadata, with chat templates rendered by Jinja2 the way transformers does."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ModelFormatError

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4
_ROLES = ("system", "user", "assistant", "tool")


def _byte_level_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":
        # llama.cpp's "smollm": every digit on its own, then the GPT-2 byte-level regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _SPLIT_PATTERNS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ModelFormatError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: smollm, default, gpt2, "
                           f"{', '.join(_SPLIT_PATTERNS)}")


# The split regex of each pre-tokenizer llama.cpp names (Llama 3 groups up to 3 digits, Qwen2 one).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PATTERNS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),
}


# A chat template comes with a model file, from whoever made it: its render is bounded in time
# and in the size of what it builds.
TEMPLATE_SECONDS = 5.0
TEMPLATE_MAX_CHARS = 4_000_000


class TemplateRaised(ValueError):
    """A chat template's own `raise_exception(message)`: the template refuses these messages
    (roles out of order, say)."""


def _template_environment(deadline: float):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(size: int) -> None:
        if size > TEMPLATE_MAX_CHARS:
            raise ModelFormatError(f"the chat template builds a value of {size:,} items; the limit is "
                                   f"{TEMPLATE_MAX_CHARS:,}")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        too_big(len(seq) * times)
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                too_big(len(left) + len(right))
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                too_big(right * abs(left).bit_length() // 8)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
            for a in (*args, *kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool):
                    too_big(a)  # 'x'.ljust(10**9), range is capped by the sandbox already
            return super().call(__context, __obj, *args, **kwargs)

    def raise_exception(message: str):
        raise TemplateRaised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def _render_template(template: str, messages: list[dict], add_generation_prompt: bool, **extra: Any) -> str:
    """The template rendered: its own refusals raise ValueError (`TemplateRaised`); a template
    that is not valid Jinja, or fails as it runs, ModelFormatError."""
    from jinja2.exceptions import TemplateError

    try:
        return _render(template, messages, add_generation_prompt, **extra)
    except (TemplateRaised, ModelFormatError):
        raise
    except TemplateError as exc:
        kind = "is not valid Jinja" if type(exc).__name__ == "TemplateSyntaxError" else "failed"
        raise ModelFormatError(f"the chat template {kind}: {exc}") from None
    except Exception as exc:  # the template's own Python errors: 1/0, a key a message lacks
        raise ModelFormatError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


def _render(template: str, messages: list[dict], add_generation_prompt: bool, **extra: Any) -> str:
    deadline = time.monotonic() + TEMPLATE_SECONDS
    compiled = _template_environment(deadline).from_string(template)

    def out_of_time() -> None:
        raise ModelFormatError(f"the chat template ran for more than {TEMPLATE_SECONDS} s (a loop that does not end?)")

    def in_template(frame, event, arg):  # line events of the template's own code
        if event == "line" and time.monotonic() > deadline:
            out_of_time()
        return in_template

    def tracer(frame, event, arg):
        return in_template if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **extra):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise ModelFormatError(f"the chat template's output passed {TEMPLATE_MAX_CHARS:,} characters")
            if time.monotonic() > deadline:
                out_of_time()
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


def check_messages(messages: Any) -> list[dict]:
    """A dialog as a list of {"role", "content"} dicts, or ValueError saying what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"a dialog must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("a dialog must hold at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in _ROLES:
            raise ValueError(f"message {i} has unknown role {m.get('role')!r}; roles are {', '.join(_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} content must be a str, got {type(m.get('content')).__name__}")
    return [dict(m) for m in messages]


class Tokenizer:
    """`encode`/`decode` text, and `apply_chat_template` for chat prompts."""

    def __init__(self, backend, *, bos_token: str | None, eos_tokens: Sequence[str], chat_template: str | None,
                 add_bos_token: bool = False) -> None:
        self._tok = backend
        self.bos_token = bos_token
        self.eos_tokens = list(eos_tokens)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_ids = [i for i in (backend.token_to_id(t) for t in self.eos_tokens) if i is not None]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ----- construction -----

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer.json (or a folder holding one); tokenizer_config.json beside it gives the
        special tokens and the chat template."""
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            backend = HFTokenizer.from_file(path)
        except Exception as exc:
            raise ModelFormatError(f"{path} is not a tokenizer.json: {exc}") from None
        config: dict = {}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as fh:
                    config = json.load(fh)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"{config_path} is not valid JSON: {exc}") from None
            if not isinstance(config, dict):
                raise ModelFormatError(f"{config_path} must hold a JSON object")

        def content(tok):
            return tok.get("content") if isinstance(tok, dict) else tok

        eos = content(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is None:  # transformers saves it beside the config since 2024
            template_path = os.path.join(os.path.dirname(path), "chat_template.jinja")
            if os.path.isfile(template_path):
                with open(template_path, encoding="utf-8", errors="strict") as fh:
                    template = fh.read()
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{config_path}: chat_template must be a string, got {type(template).__name__}")
        if eos is not None and not isinstance(eos, str):
            raise ModelFormatError(f"{config_path}: eos_token must be a string, got {type(eos).__name__}")
        return cls(backend, bos_token=content(config.get("bos_token")), eos_tokens=[eos] if eos else [],
                   chat_template=template, add_bos_token=bool(config.get("add_bos_token", False)))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer a GGUF file describes: GPT-2 style byte-level BPE ("gpt2") or the
        SentencePiece-style "llama" vocabulary."""
        from .weights.gguf import read

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path}")
        return cls.from_gguf_metadata(read(path).metadata, path)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping, path: str) -> Tokenizer:
        """`from_gguf` for a file already open (`metadata` as `weights.gguf.read` gives it)."""
        try:
            return cls._from_gguf_metadata(metadata, path)
        except ModelFormatError:
            raise
        except Exception as exc:  # tokenizers and gguf raise bare Exception, TypeError, UnicodeDecodeError
            raise ModelFormatError(f"{path}: the GGUF tokenizer metadata is corrupt ({type(exc).__name__}: {exc})") \
                from None

    @classmethod
    def _from_gguf_metadata(cls, meta: Mapping, path: str) -> Tokenizer:
        from tokenizers import AddedToken, decoders, models, normalizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelFormatError(f"{path} holds no tokenizer (tokenizer.ggml.tokens is missing)")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
            backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                             ignore_merges=False))
            backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default")
            backend.decoder = decoders.ByteLevel()
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
            backend = HFTokenizer(models.Unigram(list(zip(tokens, map(float, scores))), unk_id=unk, byte_fallback=True))
            prefix = [] if meta.get("tokenizer.ggml.add_space_prefix") is False else [normalizers.Prepend("▁")]
            backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
            backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                                + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        else:
            raise ModelFormatError(f"{path}: tokenizer model {kind!r} is not supported; supported: 'gpt2', 'llama'")
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        backend.add_special_tokens(specials)
        if user:
            backend.add_tokens(user)

        def token(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eos = [t for t in (token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.eot_token_id")) if t]
        return cls(backend, bos_token=token("tokenizer.ggml.bos_token_id"), eos_tokens=list(dict.fromkeys(eos)),
                   chat_template=meta.get("tokenizer.chat_template"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    # ----- text <-> ids -----

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if not self.eos_ids:
                raise ValueError("this tokenizer has no EOS token")
            ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a dialog, rendered from the model's own chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        messages = check_messages(messages)
        return _render_template(self.chat_template, messages, add_generation_prompt,
                                bos_token=self.bos_token or "", eos_token=(self.eos_tokens or [""])[0])


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, holding back an incomplete UTF-8 character.

    Each push decodes a short window, not the whole list (which made a token's cost grow with the
    reply): the ids from `prefix` on, against the same ids without those not yet handed out. Both
    start at the same id, so what a decoder does at the start of a text (SentencePiece drops a
    leading space) happens to both alike, and their difference is the new text (the way vLLM's
    and Hugging Face's streamers do it). Joined, the pieces are the whole list's decode."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # where the window starts
        self.read = 0  # ids whose text has been handed out

    def _new_text(self) -> tuple[str, str]:
        """(the window's text, the part of it not handed out yet)."""
        handed = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        return text, text[len(handed):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text, piece = self._new_text()
        if not piece or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is left, even an incomplete character (as the full decode would show it)."""
        _, piece = self._new_text()
        self.read = len(self.ids)
        return piece
