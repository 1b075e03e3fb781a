"""`ellm serve` under load, measured as clients see it: the official openai client on loopback,
1, 4, 8 and 16 concurrent clients, each streaming 64-token completions (end-of-text banned so
every reply has 64 tokens). Prints aggregate generated tokens/s and p50/p99 time to first token,
and the same for llama-cpp-python's server on the same file when it is installed (optional).

Each server runs the whole sweep of client counts SWEEPS times over (the machine is shared and
noisy, and a single client's figure moves most); each cell is the median of the sweeps. The host's
speed drifts over a run, so "vs 1 client" is the median of each sweep's own ratio, its figure over
the single client's of the same sweep, seconds apart; the ratio of the medians is printed below.

Bounded: ROUNDS requests per client, each with a 120 s timeout; both servers bind 127.0.0.1.
"""

import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import table  # noqa: E402

import numpy as np  # noqa: E402
import openai  # noqa: E402

import ellm  # noqa: E402
from ellm._bundled import bundled_model_path  # noqa: E402

CLIENTS = (1, 4, 8, 16)
ROUNDS = 2
SWEEPS = 5
TOKENS = 64
PROMPTS = ["Write a story about a lighthouse keeper:", "Explain how bread is made:", "Describe a city at night:",
           "List facts about the moon:", "Tell me about the ocean:", "Write a letter to a friend:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=2)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            client.models.list()
            return proc
        except openai.APIError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not come up")


def load(port: int, clients: int, bias: dict) -> tuple[float, float, float]:
    """(aggregate tokens/s, p50 TTFT s, p99 TTFT s) of `clients` clients streaming ROUNDS replies each."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
    ttfts, tokens = [], []

    def run(i: int) -> None:
        for r in range(ROUNDS):
            sent = time.perf_counter()
            first, n, pieces = None, None, 0
            stream = client.completions.create(model="m", prompt=PROMPTS[(i + r) % len(PROMPTS)], max_tokens=TOKENS,
                                               temperature=0.8, seed=i * 100 + r, logit_bias=bias, stream=True,
                                               stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - sent
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            ttfts.append(first if first is not None else float("nan"))
            tokens.append(pieces if n is None else n)  # llama-cpp-python streams one token a chunk, no usage

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return sum(tokens) / wall, float(np.nanpercentile(ttfts, 50)), float(np.nanpercentile(ttfts, 99))


def measure(name: str, cmd: list[str], port: int, bias: dict) -> list[tuple]:
    proc = start(cmd, port)
    try:
        load(port, 1, bias)  # warm-up
        sweeps = [[load(port, c, bias) for c in CLIENTS] for _ in range(SWEEPS)]
        return [(name, c, float(np.median([sweep[i][0] for sweep in sweeps])),
                 float(np.median([sweep[i][0] / sweep[0][0] for sweep in sweeps])),
                 *(float(np.median([sweep[i][j] for sweep in sweeps])) for j in (1, 2)))
                for i, c in enumerate(CLIENTS)]
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    path = bundled_model_path()
    stops = ellm.Tokenizer.from_gguf(path).eos_ids
    bias = {str(t): -100 for t in stops}
    threads = os.environ.get("RAYON_NUM_THREADS", "2")
    port = free_port()
    rows = measure("ellm", [sys.executable, "-m", "ellm", "serve", path, "--port", str(port), "--slots",
                            str(max(CLIENTS)), "--max-seq-len", "512", "--log-level", "warning"], port, bias)
    # llama-cpp-python's server from this Python or the one ELLM_LLAMA_CPP_PYTHON names
    llama_python = os.environ.get("ELLM_LLAMA_CPP_PYTHON") or sys.executable
    if os.path.exists(llama_python) and subprocess.run([llama_python, "-c", "import llama_cpp.server"],
                                                       capture_output=True).returncode == 0:
        port = free_port()
        rows += measure("llama-cpp-python", [llama_python, "-m", "llama_cpp.server", "--model", path, "--host",
                                             "127.0.0.1", "--port", str(port), "--n_threads", threads,
                                             "--n_ctx", "2048"], port, bias)
    else:
        print("llama-cpp-python's server is not installed (pip install 'llama-cpp-python[server]', built as "
              "benches/bench_vs_llamacpp.py says, here or in the Python ELLM_LLAMA_CPP_PYTHON names): its rows "
              "are left out")
    single = {name: tps for name, c, tps, *_ in rows if c == 1}  # CLIENTS[0] == 1
    table(f"bench_serve: {TOKENS}-token streamed replies, {ROUNDS} per client, {threads} threads, loopback, "
          f"median of {SWEEPS} sweeps",
          ["server", "clients", "tokens/s", "vs 1 client", "TTFT p50 ms", "TTFT p99 ms"],
          [(n, c, f"{tps:.0f}", f"{scaling:.2f}x", f"{p50 * 1000:.0f}", f"{p99 * 1000:.0f}")
           for n, c, tps, scaling, p50, p99 in rows])
    for name in single:
        print(f"{name}, ratio of the medians: " + ", ".join(f"{c} clients {tps / single[name]:.2f}x"
                                                            for n, c, tps, *_ in rows if n == name and c > 1))
    if "llama-cpp-python" in single:
        ours = {c: tps for n, c, tps, *_ in rows if n == "ellm"}
        theirs = {c: tps for n, c, tps, *_ in rows if n != "ellm"}
        print("ellm / llama-cpp-python: " + ", ".join(f"{c} clients {ours[c] / theirs[c]:.2f}x" for c in CLIENTS))


if __name__ == "__main__":
    main()
