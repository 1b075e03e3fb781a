"""About 400 hostile inputs, as a new user would try them, each run in a forked child with a time
limit, and a table of what happened: handled (a clear error, one of the exceptions ellm promises for bad input, or the right result
where the input is fine), accepted (no error for input that is broken), a crash (an abort, a
signal or another exception), a hang (past the time limit), or over 1 GB of memory at its peak.

    python fuzz/hostile.py            # the table for the ellm this Python imports

Only public APIs are used, so the same file measures an older build too (the issue's "before").
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loaders  # noqa: E402  (seed files and the byte mutator)

ALLOWED = (ValueError, TypeError, MemoryError, OSError)  # ModelFormatError is a ValueError
TIME_LIMIT = 20.0
MEMORY_LIMIT = 1 << 30
SCRATCH = tempfile.mkdtemp(prefix="ellm-hostile-")
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "archs", "llama")
warnings.simplefilter("ignore")


class Accepted(Exception):
    """Broken input that loaded without complaint."""


def write(name: str, data: bytes) -> str:
    path = os.path.join(SCRATCH, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# ----- the inputs -----

SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_seq_len", "max_batch_size")
BAD_SIZES = (0, -1, 2**31, 2**40, 2**62, "64", 64.5, None, True, [64])


def config_cases():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, max_seq_len=256, max_batch_size=2)

    def build(d):
        from ellm import ModelArgs, Transformer

        model = Transformer(ModelArgs(**d))
        model.forward  # noqa: B018 - built; a working model from a broken config is the defect
        raise Accepted()

    for field in SIZE_FIELDS:
        for value in BAD_SIZES:
            if value is None and field in ("head_dim", "num_key_value_heads", "max_seq_len"):
                continue  # None means the default (hidden / heads, the query heads, the position limit)
            d = dict(base, **{field: value})
            if field == "max_seq_len" and isinstance(value, int) and value > 256:
                d["max_position_embeddings"] = value
            yield "config fields", f"{field}={value!r}", lambda d=d: build(d)
    for text in ("", "{", "[]", "null", '"x"', '{"vocab_size": 1e400}', '{"hidden_size": NaN}',
                 json.dumps(dict(base, rms_norm_eps=-1)), json.dumps(dict(base, rope_theta="x")),
                 json.dumps(dict(base, rope_scaling={"rope_type": "linear", "factor": 0}))):
        def from_file(text=text):
            from ellm import ModelArgs, Transformer

            Transformer(ModelArgs.from_config_file(write("config.json", text.encode())))
            raise Accepted()
        yield "config files", f"config.json {text[:30]!r}", from_file


def ops_cases():
    from ellm import ops

    huge = lambda *shape: np.broadcast_to(np.float32(1), shape)  # noqa: E731 - no memory behind it
    cases = {
        "matmul out 2^40": lambda: ops.matmul(huge(2**20, 8), huge(8, 2**20)),
        "matmul out 2^36": lambda: ops.matmul(huge(2**18, 8), huge(8, 2**18)),
        "linear out 2^40": lambda: ops.linear(huge(2**20, 8), huge(2**20, 8)),
        "linear out 2^34": lambda: ops.linear(huge(2**17, 8), huge(2**17, 8)),
        "matmul 3-d out 2^40": lambda: ops.matmul(huge(2**10, 2**10, 4), huge(4, 2**20)),
        "matmul shapes disagree": lambda: ops.matmul(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)),
        "linear shapes disagree": lambda: ops.linear(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)),
        "matmul 0-d": lambda: ops.matmul(np.float32(1), np.float32(2)),
        "matmul strings": lambda: ops.matmul("a", "b"),
        "matmul object": lambda: ops.matmul(np.array([object()]), np.ones((1, 1))),
        "rms_norm weight mismatch": lambda: ops.rms_norm(np.ones((2, 4), np.float32), np.ones(3, np.float32)),
        "rms_norm eps -1": lambda: ops.rms_norm(np.ones((2, 4), np.float32), np.ones(4, np.float32), -1.0),
        "softmax empty": lambda: ops.softmax(np.ones((0,), np.float32)),
        "swiglu mismatch": lambda: ops.swiglu(np.ones(4, np.float32), np.ones(5, np.float32)),
        "linear bias mismatch": lambda: ops.linear(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32),
                                                   np.ones(5, np.float32)),
    }
    for name, call in cases.items():
        def run(call=call, name=name):
            call()
            if "disagree" in name or "mismatch" in name or "strings" in name or "object" in name or "2^" in name:
                raise Accepted()
        yield "op shapes", name, run


def gguf_cases():
    seed = loaders._tiny_gguf()
    rng = random.Random(1)

    def load(data: bytes):
        from ellm import Transformer

        Transformer.from_pretrained(write("model.gguf", data), max_seq_len=16).forward([[0]])

    # declared counts: n_tensors at byte 8, n_kv at 16 (GGUF v3)
    for field, at in (("tensor count", 8), ("key/value count", 16)):
        for power in (16, 24, 32, 40, 50, 60, 63):
            data = bytearray(seed)
            data[at:at + 8] = struct.pack("<Q", 2**power)
            yield "GGUF headers", f"{field} 2^{power}", lambda d=bytes(data): load(d)
    # the first key's length, and every string length field we can find, made huge
    for power in (20, 32, 48, 62):
        data = bytearray(seed)
        data[24:32] = struct.pack("<Q", 2**power)
        yield "GGUF headers", f"first key length 2^{power}", lambda d=bytes(data): load(d)
    for cut in sorted({int(len(seed) * f) for f in np.linspace(0, 0.999, 40)}):
        yield "GGUF truncated", f"first {cut} bytes", lambda d=seed[:cut]: load(d)
    for i in range(90):
        yield "GGUF flipped bytes", f"mutation {i}", lambda d=loaders.mutate(rng, seed, [seed]): load(d)


def safetensors_cases():
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(TINY, "model.safetensors"))
    config = open(os.path.join(TINY, "config.json"), "rb").read()
    entries, data, at = {}, b"", 0
    for name, t in tensors.items():
        raw = t.astype(np.float32).tobytes()
        entries[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        data, at = data + raw, at + len(raw)
    first = next(iter(entries))
    rng = random.Random(2)

    def load(header: dict | bytes, body: bytes = data, declared: int | None = None, broken: bool = True):
        from ellm import Transformer

        folder = os.path.join(SCRATCH, "st")
        os.makedirs(folder, exist_ok=True)
        raw = json.dumps(header).encode() if isinstance(header, dict) else header
        with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
            fh.write(struct.pack("<Q", len(raw) if declared is None else declared) + raw + body)
        with open(os.path.join(folder, "config.json"), "wb") as fh:
            fh.write(config)
        Transformer.from_pretrained(folder).forward([[1]])
        if broken:
            raise Accepted()

    def changed(**fields):
        h = json.loads(json.dumps(entries))
        h[first].update(fields)
        return h

    n = entries[first]["data_offsets"][1]
    variants = {
        "negative offsets": changed(data_offsets=[-8, n - 8]),
        "offsets reversed": changed(data_offsets=[n, 0]),
        "offsets past the end": changed(data_offsets=[0, len(data) + 64]),
        "overlapping tensors": changed(data_offsets=[4, n + 4]),
        "offsets not ints": changed(data_offsets=["0", str(n)]),
        "offsets of three": changed(data_offsets=[0, n, 2]),
        "shape too big for bytes": changed(shape=[10**6, 10**6]),
        "negative shape": changed(shape=[-1, 8]),
        "unknown dtype": changed(dtype="F128"),
        "dtype not a string": changed(dtype=7),
        "shape a string": changed(shape="[1,2]"),
        "metadata not a dict": dict(entries, __metadata__=[1, 2]),
        "metadata values not strings": dict(entries, __metadata__={"format": 1}),
        "entry not a dict": dict(entries, **{first: 5}),
        "header a list": json.dumps([1, 2]).encode(),
        "header not JSON": b"{not json",
        "header not UTF-8": b'{"a": "\xff\xfe"}',
    }
    for name, header in variants.items():
        yield "safetensors headers", name, lambda h=header: load(h)
    for power in (20, 32, 40, 62, 63):
        yield "safetensors headers", f"header length 2^{power}", lambda p=power: load(entries, declared=2**p)
    base = json.dumps(entries).encode()
    for i in range(40):
        def flipped(i=i):
            load(loaders.mutate(rng, base, [base]), broken=False)  # a mutation may still be valid
        yield "safetensors flipped header bytes", f"mutation {i}", flipped


def tokenizer_cases():
    seed = loaders.seeds("tokenizer")[0]
    rng = random.Random(3)
    for i in range(60):
        yield "tokenizer and chat template files", f"mutation {i}", \
            lambda d=loaders.mutate(rng, seed, [seed]): loaders.tokenizer(d)
    half = len(seed) // 2
    tok = seed[:half]
    templates = {
        "loops forever": "{% for i in range(10**12) %}x{% endfor %}",
        "builds a huge string": "{{ 'x' * 10**10 }}",
        "nested huge": "{% set s = 'x' * 10**6 %}{% for i in range(10**4) %}{{ s }}{% endfor %}",
        "reads a file": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "syntax error": "{% for m in messages %}",
        "undefined call": "{{ nope() }}",
        "raises": "{{ raise_exception('no') }}",
        "template a number": 5,
        "template a list": [{"name": "default", "template": "{{ 1/0 }}"}],
        "divides by zero": "{{ 1/0 }}",
    }
    for name, template in templates.items():
        cfg = json.dumps({"eos_token": "<|im_end|>", "chat_template": template}).encode()
        width = max(len(tok), len(cfg))
        yield "chat templates", name, lambda d=tok.ljust(width) + cfg.ljust(width): loaders.tokenizer(d)


def thread_cases():
    def generate_from_threads(n_threads: int):
        import ellm

        model = ellm.Transformer.from_pretrained(TINY, max_batch_size=1, max_seq_len=64)
        expected = model.generate([[1, 2, 3]], 8, temperature=0)[0]
        errors, results = [], []

        def run():
            try:
                results.append(model.generate([[1, 2, 3]], 8, temperature=0)[0])
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        if any(r != expected for r in results):
            raise AssertionError("a thread got another result")

    for n in (2, 4, 8):
        for repeat in range(3):
            yield "threads sharing a model", f"{n} threads, round {repeat}", lambda n=n: generate_from_threads(n)


def all_cases():
    for make in (config_cases, ops_cases, gguf_cases, safetensors_cases, tokenizer_cases, thread_cases):
        yield from make()


# ----- running them -----

def outcome_of(fn) -> tuple[str, str, float, int]:
    """(outcome, detail, seconds, peak bytes) of fn run in a forked child."""
    read, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            fn()
            result = ("ok", "")
        except Accepted:
            result = ("accepted", "")
        except ALLOWED as exc:
            result = ("clear", f"{type(exc).__name__}: {str(exc)[:120]}")
        except BaseException as exc:  # noqa: BLE001
            result = ("crash", f"{type(exc).__name__}: {str(exc)[:120]}")
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - started > TIME_LIMIT:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            os.close(read)
            return "hang", f"over {TIME_LIMIT:.0f} s", time.perf_counter() - started, usage.ru_maxrss * 1024
        time.sleep(0.002)
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss * 1024
    message = os.read(read, 1 << 16)
    os.close(read)
    if os.WIFSIGNALED(status):
        return "crash", f"killed by signal {os.WTERMSIG(status)}", seconds, peak
    kind, detail = json.loads(message) if message else ("crash", f"exit status {os.WEXITSTATUS(status)}")
    if kind in ("ok", "clear") and peak > MEMORY_LIMIT:
        kind = "memory"
    return kind, detail, seconds, peak


def main() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # aborts leave no core files
    import ellm

    print(f"ellm from {os.path.dirname(ellm.__file__)}, backend {ellm.get_backend()}", flush=True)
    rows: dict[str, dict[str, int]] = {}
    findings = []
    slowest = (0.0, "")
    for category, name, fn in all_cases():
        kind, detail, seconds, peak = outcome_of(fn)
        counts = rows.setdefault(category, {"inputs": 0, "handled": 0, "accepted": 0, "crash": 0, "hang": 0,
                                            "memory": 0})
        counts["inputs"] += 1
        counts["handled" if kind in ("ok", "clear") else kind] += 1
        if kind not in ("ok", "clear"):
            findings.append(f"{category} / {name}: {kind} {detail}")
        slowest = max(slowest, (seconds, f"{category} / {name}"))
    columns = ["inputs", "handled", "accepted", "crash", "hang", "memory"]
    print(f"\n{'category':<36}" + "".join(f"{c:>10}" for c in columns))
    total = dict.fromkeys(columns, 0)
    for category, counts in rows.items():
        print(f"{category:<36}" + "".join(f"{counts[c]:>10}" for c in columns))
        for c in columns:
            total[c] += counts[c]
    print(f"{'total':<36}" + "".join(f"{total[c]:>10}" for c in columns))
    print(f"\nslowest: {slowest[1]} ({slowest[0]:.2f} s)")
    print("\nnot a clear error:")
    for f in findings:
        print(f"  {f}")


if __name__ == "__main__":
    main()
