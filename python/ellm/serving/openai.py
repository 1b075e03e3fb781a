"""OpenAI's completion and chat-completion shapes over the engine: one checked `Call` per request,
which turns the engine's events into OpenAI's response dict or its stream of chunk dicts. The
Python API (`Llama.create_completion`, `create_chat_completion`) and the HTTP server share it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from ..tokenizer import check_messages
from .engine import Engine, Event, Request
from .params import InvalidRequestError, SamplingParams, sampling_params

# Settings that change what is generated, which ellm does not do: refused rather than ignored.
_UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "suffix": "suffix (insertion)", "audio": "audio output",
    "prediction": "predicted outputs",
}


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key, what in _UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}, "none", "auto") or (key == "suffix" and body.get(key)):
            raise InvalidRequestError(f"{what} are not supported by this server ({key!r})", key)
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequestError(f"n={n!r} is not supported: ellm returns one choice per request", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequestError(f"best_of={best_of!r} is not supported", "best_of")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, Mapping) or fmt.get("type") != "text"):
        raise InvalidRequestError("response_format other than {'type': 'text'} (JSON mode, json_schema) is not "
                                  "supported", "response_format")


def _message_text(messages: Any) -> list[dict]:
    """OpenAI messages, whose content may also be a list of text parts, as {"role", "content": str}."""
    if isinstance(messages, (list, tuple)):
        flat = []
        for i, m in enumerate(messages):
            if isinstance(m, Mapping) and isinstance(m.get("content"), list):
                parts = m["content"]
                if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in parts):
                    raise InvalidRequestError(f"message {i}: only text content parts are supported", "messages")
                m = {**m, "content": "".join(p["text"] for p in parts)}
            flat.append(m)
        messages = flat
    try:
        return [{"role": m["role"], "content": m["content"]} for m in check_messages(messages)]
    except ValueError as exc:
        raise InvalidRequestError(str(exc), "messages") from None


class Call:
    """One request: checked, submitted, and read back as OpenAI dicts."""

    def __init__(self, serving: OpenAIServing, body: Mapping[str, Any], chat: bool) -> None:
        if not isinstance(body, Mapping):
            raise InvalidRequestError("the request body must be a JSON object")
        _refuse_unsupported(body)
        self.serving, self.chat = serving, chat
        tokenizer = serving.tokenizer
        self.echo = False
        if chat:
            messages = _message_text(body.get("messages"))
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
            logprobs = body.get("top_logprobs") or 0 if body.get("logprobs") else None
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        else:
            prompt = self._prompt_ids(body.get("prompt"))
            logprobs = body.get("logprobs")
            self.echo = bool(body.get("echo"))
            max_tokens = body.get("max_tokens", 16)
        limit = serving.engine.max_seq_len
        if len(prompt) >= limit:
            raise InvalidRequestError(f"This model's maximum context length is {limit} tokens. However, your "
                                      f"messages resulted in {len(prompt)} tokens.", "messages" if chat else "prompt",
                                      "context_length_exceeded")
        if self.echo and logprobs is not None:
            raise InvalidRequestError("echo together with logprobs is not supported", "echo")
        self.prompt = prompt
        self.params: SamplingParams = sampling_params(
            max_tokens=max_tokens, room=limit - len(prompt), vocab_size=serving.engine.vocab_size,
            temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0), top_k=body.get("top_k"),
            seed=body.get("seed"), stop=body.get("stop"), presence_penalty=body.get("presence_penalty", 0.0),
            frequency_penalty=body.get("frequency_penalty", 0.0), repeat_penalty=body.get("repeat_penalty", 1.0),
            logit_bias=body.get("logit_bias"), logprobs=logprobs)
        options = body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage")) if isinstance(options, Mapping) else False
        self.stream = bool(body.get("stream"))
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = body.get("model") or serving.model_name
        self.text: list[str] = []
        self.logprobs: list[Any] = []
        self.finish_reason: str | None = None
        self.request: Request | None = None
        self._started = False

    def _prompt_ids(self, prompt: Any) -> list[int]:
        tok = self.serving.tokenizer
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = tok.encode(prompt, bos=tok.add_bos_token)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise InvalidRequestError("a batch of prompts is not supported: send one prompt per request", "prompt")
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < self.serving.engine.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is out of range", "prompt")
        return ids

    # ----- running -----

    def submit(self, on_event=None) -> Request:
        self.request = self.serving.engine.submit(self.prompt, self.params, on_event)
        return self.request

    def chunks(self, event: Event) -> list[dict]:
        """The stream chunks for one event (and the closing ones after the last)."""
        self.take(event)
        out = []
        if self.chat and not self._started:
            out.append(self._chunk({"role": "assistant", "content": ""}, None, None))
        elif not self.chat and not self._started and self.echo:
            out.append(self._chunk(self.serving.tokenizer.decode(self.prompt), None, None))
        self._started = True
        logprobs = self._logprobs(event) if self.params.logprobs is not None else None
        if event.text or logprobs:
            out.append(self._chunk({"content": event.text} if self.chat else event.text, None, logprobs))
        if event.finish_reason is not None:
            out.append(self._chunk({} if self.chat else "", self.finish_reason, None))
            if self.include_usage:
                out.append(self._envelope([], self.usage()))
        return out

    def take(self, event: Event) -> None:
        self.text.append(event.text)
        if self.params.logprobs is not None:
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason

    def response(self, events: Iterator[Event] | None = None) -> dict:
        """The whole response, after every event was taken (or from `events`)."""
        for event in events or ():
            self.take(event)
        text = "".join(self.text)
        logprobs = self._logprobs_of(self.logprobs) if self.params.logprobs is not None else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
        else:
            if self.echo:
                text = self.serving.tokenizer.decode(self.prompt) + text
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": self.serving.fingerprint,
                "choices": [choice], "usage": self.usage()}

    def usage(self) -> dict:
        done = self.request.completion_tokens if self.request else 0
        return {"prompt_tokens": len(self.prompt), "completion_tokens": done,
                "total_tokens": len(self.prompt) + done}

    # ----- shapes -----

    def _envelope(self, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": self.serving.fingerprint,
               "choices": choices}
        if self.include_usage:
            out["usage"] = usage
        return out

    def _chunk(self, delta: Any, finish: str | None, logprobs: Any) -> dict:
        choice = ({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish} if self.chat
                  else {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish})
        return self._envelope([choice])

    def _logprobs(self, event: Event) -> Any:
        return self._logprobs_of(event.logprobs) if event.logprobs else None

    def _logprobs_of(self, items: list) -> Any:
        decode = self.serving.token_text
        if self.chat:
            def entry(token: int, lp: float) -> dict:
                text = decode(token)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                                for i in items]}
        tokens = [decode(i.token) for i in items]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [i.logprob for i in items],
                "top_logprobs": [{decode(t): lp for t, lp in i.top} for i in items], "text_offset": offsets}


class OpenAIServing:
    """The engine, the tokenizer and the model's name, as the OpenAI calls use them."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, fingerprint: str = "ellm-0.1.0") -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.fingerprint = fingerprint  # which server answered (each Ray Serve replica has its own)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def call(self, body: Mapping[str, Any], chat: bool) -> Call:
        return Call(self, body, chat)

    def run(self, body: Mapping[str, Any], chat: bool) -> dict | Iterator[dict]:
        """A response dict, or with stream=True an iterator of chunk dicts (closing it cancels)."""
        call = self.call(body, chat)
        if call.stream:
            return self._stream(call)
        request = call.submit()
        try:
            return call.response(iter(request))
        finally:
            request.cancel()  # a KeyboardInterrupt while waiting frees the slot

    def _stream(self, call: Call) -> Iterator[dict]:
        request = call.submit()
        try:
            for event in request:
                yield from call.chunks(event)
        finally:
            request.cancel()
