"""Llama: text in, text out. Meta's `Llama.build`, `text_completion` and `chat_completion`,
llama-cpp-python style streaming and stop strings, on a Transformer and its Tokenizer."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ._bundled import bundled_model_path
from .model import Transformer
from .tokenizer import IncrementalDecoder, Tokenizer, check_messages


class StopStringFilter:
    """Passes text through, cutting it before the first stop string; text that could still
    become a stop string is held back until it is decided."""

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be a str or a list of str")
    return list(stop)


class Llama:
    """A model and its tokenizer. `model_path` is a Hugging Face folder or a .gguf file; None
    means the bundled SmolLM2-135M-Instruct."""

    def __init__(self, model_path: str | os.PathLike | None = None, tokenizer_path: str | os.PathLike | None = None,
                 max_seq_len: int = 2048, max_batch_size: int = 4, seed: int = 1,
                 progress: Callable | None = None, dtype: str = "auto", model: Transformer | None = None) -> None:
        path = os.fspath(model_path) if model_path is not None else bundled_model_path()
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model at {path}")
        self.model_path = path
        if model is None:
            model = Transformer.from_pretrained(path, dtype=dtype, max_seq_len=max_seq_len,
                                                max_batch_size=max_batch_size, progress=progress)
        elif not isinstance(model, Transformer):
            raise TypeError(f"model must be a Transformer (or a PipelineModel), got {type(model).__name__}")
        self.model = model
        gguf_metadata, self.model._gguf_metadata = self.model._gguf_metadata, None
        if tokenizer_path is None and gguf_metadata is None and path.endswith(".gguf"):
            tokenizer_path = path  # a model built elsewhere (a pipeline's stages) from this file
        if tokenizer_path is not None:
            tokenizer_path = os.fspath(tokenizer_path)
            self.tokenizer = (Tokenizer.from_gguf(tokenizer_path) if tokenizer_path.endswith(".gguf")
                              else Tokenizer.from_file(tokenizer_path))
        elif gguf_metadata is not None:  # the file the model came from, already open
            self.tokenizer = Tokenizer.from_gguf_metadata(gguf_metadata, path)
        else:
            self.tokenizer = Tokenizer.from_file(path)
        self.seed = seed
        self.stop_ids = sorted(set(self.model.model_args.eos_token_id or []) | set(self.tokenizer.eos_ids))
        self._serving = None
        self._serving_lock = threading.Lock()

    @classmethod
    def build(cls, ckpt_dir: str | os.PathLike | None = None, tokenizer_path: str | os.PathLike | None = None,
              max_seq_len: int = 2048, max_batch_size: int = 4, seed: int = 1, **kwargs: Any) -> Llama:
        return cls(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size, seed=seed, **kwargs)

    # ----- prompts -----

    def _encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, bos=self.tokenizer.add_bos_token)
        self._check_length(ids)
        return ids

    def _encode_dialog(self, dialog: Sequence[Mapping[str, Any]]) -> list[int]:
        ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(check_messages(dialog)))
        self._check_length(ids)
        return ids

    def _check_length(self, ids: list[int]) -> None:
        limit = self.model.model_args.max_seq_len
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_seq_len is {limit}, leaving no room to generate")

    def _max_gen(self, max_gen_len: int | None) -> int:
        return self.model.model_args.max_seq_len - 1 if max_gen_len is None else int(max_gen_len)

    # ----- the two generation paths -----

    def _complete(self, prompts: list[list[int]], max_gen_len: int, stop: list[str], **sampling: Any):
        """Batch: (text, ids, logprobs) per prompt, text cut before the first stop string."""
        tokens, logprobs = self.model.generate(prompts, max_gen_len, stop_tokens=self.stop_ids, **sampling)
        results = []
        for i, ids in enumerate(tokens):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = [text.find(s) for s in stop if s in text]
            results.append((text[:min(cut)] if cut else text, ids, logprobs[i] if logprobs else None))
        return results

    def _stream(self, prompt: list[int], max_gen_len: int, stop: list[str], **sampling: Any) -> Iterator[str]:
        decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens=True)
        stops = StopStringFilter(stop)
        steps = self.model.generate_steps([prompt], max_gen_len, stop_tokens=self.stop_ids, **sampling)
        for chosen in steps:
            token = int(chosen[0])
            if token < 0:
                continue
            if token in self.stop_ids:
                break
            piece = stops.feed(decoder.push(token))
            if piece:
                yield piece
            if stops.stopped:
                steps.close()
                return
        tail = stops.feed(decoder.flush()) + stops.flush()
        if tail:
            yield tail

    # ----- public API -----

    def generate(self, prompt: Any, max_gen_len: int = 256, temperature: float = 0.6, top_p: float = 0.9,
                 top_k: int | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stream: bool = False, repetition_penalty: float = 1.0):
        """A str gives a str (an iterator of pieces with stream=True); a list of str gives a list
        of str; a list of token lists gives Meta's (tokens, logprobs)."""
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=self.seed if seed is None else seed,
                        repetition_penalty=repetition_penalty)
        stops = _stop_list(stop)
        max_gen_len = self._max_gen(max_gen_len)
        if isinstance(prompt, str):
            ids = self._encode_text(prompt)
            if stream:
                return self._stream(ids, max_gen_len, stops, **sampling)
            return self._complete([ids], max_gen_len, stops, **sampling)[0][0]
        prompt = list(prompt)
        if stream:
            raise ValueError("stream=True takes a single str prompt")
        if prompt and all(isinstance(p, str) for p in prompt):
            return [r[0] for r in self._complete([self._encode_text(p) for p in prompt], max_gen_len, stops, **sampling)]
        if prompt and all(isinstance(p, (list, tuple)) for p in prompt):
            return self.model.generate(prompt, max_gen_len, stop_tokens=self.stop_ids, **sampling)
        raise TypeError("prompt must be a str, a list of str, or a list of token-id lists")

    def text_completion(self, prompts: Sequence[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False, echo: bool = False,
                        seed: int | None = None) -> list[dict]:
        """Meta's text_completion: `[{"generation": str, "tokens"?: [str], "logprobs"?: [float]}]`."""
        if isinstance(prompts, str):
            raise TypeError("text_completion takes a list of prompts; wrap a single str in a list")
        ids = [self._encode_text(p) for p in prompts]
        tokens, lps = self.model.generate(ids, self._max_gen(max_gen_len), temperature=temperature, top_p=top_p,
                                          logprobs=logprobs, echo=echo, seed=self.seed if seed is None else seed,
                                          stop_tokens=self.stop_ids)
        out = []
        for i, t in enumerate(tokens):
            item: dict[str, Any] = {"generation": self.tokenizer.decode(t, skip_special_tokens=True)}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in t]
                item["logprobs"] = lps[i]
            out.append(item)
        return out

    def chat_completion(self, dialogs: Any, temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False, stream: bool = False,
                        stop: str | Sequence[str] | None = None, seed: int | None = None):
        """One dialog (a list of message dicts) gives one `{"generation": {"role": "assistant",
        "content": str}}`; a list of dialogs gives a list. stream=True (one dialog) gives an
        iterator of content pieces."""
        if not isinstance(dialogs, Sequence) or isinstance(dialogs, (str, bytes)) or not dialogs:
            raise ValueError("chat_completion takes a dialog (a non-empty list of messages) or a list of dialogs")
        single = isinstance(dialogs[0], Mapping)
        batch = [dialogs] if single else list(dialogs)
        prompts = [self._encode_dialog(d) for d in batch]
        sampling = dict(temperature=temperature, top_p=top_p, seed=self.seed if seed is None else seed)
        stops = _stop_list(stop)
        if stream:
            if not single:
                raise ValueError("stream=True takes a single dialog")
            return self._stream(prompts[0], self._max_gen(max_gen_len), stops, **sampling)
        results = self._complete(prompts, self._max_gen(max_gen_len), stops, logprobs=logprobs, **sampling)
        out = []
        for text, ids, lps in results:
            item: dict[str, Any] = {"generation": {"role": "assistant", "content": text}}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in ids]
                item["logprobs"] = lps
            out.append(item)
        return out[0] if single else out

    # ----- llama-cpp-python's OpenAI-shaped calls (the same dicts as `ellm serve`) -----

    def serving(self, **engine_options: Any):
        """The continuous-batching engine behind the OpenAI-shaped calls (started on first use, one
        slot per max_batch_size): several threads' requests run together, one step at a time."""
        from .serving import Engine, OpenAIServing

        with self._serving_lock:
            if self._serving is None or not self._serving.engine.alive:
                engine = Engine(self.model, self.tokenizer, self.stop_ids, **engine_options)
                name = os.path.basename(self.model_path.rstrip("/")) or "ellm"
                self._serving = OpenAIServing(engine, self.tokenizer, name)
            return self._serving

    def close(self) -> None:
        """Stop the serving engine, if one was started."""
        with self._serving_lock:
            if self._serving is not None:
                self._serving.engine.close()
                self._serving = None

    def create_completion(self, prompt: str | list[int], max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, top_k: int = 40, stream: bool = False,
                          stop: str | list[str] | None = None, seed: int | None = None, echo: bool = False,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          logit_bias: dict | None = None, logprobs: int | None = None, **openai_fields: Any):
        """OpenAI's text completion as llama-cpp-python returns it: a `text_completion` dict, or with
        stream=True an iterator of chunk dicts. Unsupported settings (n > 1, suffix, ...) raise
        InvalidRequestError (a ValueError)."""
        body = dict(openai_fields, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, stream=stream, stop=stop, seed=self.seed if seed is None else seed, echo=echo,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    repeat_penalty=repeat_penalty, logit_bias=logit_bias, logprobs=logprobs)
        return self.serving().run(body, chat=False)

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, stream: bool = False,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, logit_bias: dict | None = None, logprobs: bool = False,
                               top_logprobs: int | None = None, **openai_fields: Any):
        """OpenAI's chat completion as llama-cpp-python returns it: a `chat.completion` dict, or with
        stream=True an iterator of `chat.completion.chunk` dicts."""
        body = dict(openai_fields, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, stream=stream, stop=stop, seed=self.seed if seed is None else seed,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    repeat_penalty=repeat_penalty, logit_bias=logit_bias, logprobs=logprobs, top_logprobs=top_logprobs)
        return self.serving().run(body, chat=True)
