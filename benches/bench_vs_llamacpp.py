"""ellm against llama.cpp on GGUF files, 2 threads, measured alternately in one run, one table.

Files: the bundled SmolLM2-135M-Instruct Q4_1, and Q4_0, Q8_0 and Q4_K_M made from it by
llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`, allow_requantize), cached in
`benches/.models/`. Each measurement runs in a fresh process (so load time and peak RSS are a
cold model's), ellm and llama.cpp taking turns; the table shows the median of the rounds. Load
takes LOAD_SAMPLES processes a round (one alone moved 30% between runs here).

llama.cpp comes from llama-cpp-python compiled from source for this CPU without a native build
(AVX-512/VNNI on and AMX off where the CPU has AVX-512; AVX2/FMA/F16C on a CPU without it):
either importable here, or in the Python named by ELLM_LLAMA_CPP_PYTHON, or built by
`--build` into `benches/.llama-venv` (a few minutes), with `pip install --no-cache-dir` so a
wheel built for another CPU is not reused:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    -DGGML_AVX_VNNI=ON" pip install --no-cache-dir llama-cpp-python
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_AVX512=OFF" pip install --no-cache-dir llama-cpp-python
Without it the benchmark says so and exits (it is not part of CI).

Usage: python benches/bench_vs_llamacpp.py [--build] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, ".models")
LLAMA_VENV = os.path.join(HERE, ".llama-venv")

def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split()[2:]) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


# a native build would emit AMX on the AVX-512 machines this was first measured on, which fault
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"
              if "avx512f" in cpu_flags() else
              "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF")
THREADS = 2
PROMPT = 128
DECODE_STEPS = 64
LOAD_SAMPLES = 5  # fresh processes per round, engine and file, that time the load (one also the rest)
# llama.cpp's file types (llama_ftype) for the files made from the bundled one
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


# ----- the measurements, each in its own process -----

def rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(engine: str, path: str, task: str) -> dict:
    tokens = [100 + i % 1000 for i in range(512)]
    if engine == "ellm":
        import numpy as np

        import ellm

        if task == "chat":
            t = time.perf_counter()
            llm = ellm.Llama(max_seq_len=1024)
            llm.chat_completion([{"role": "user", "content": "Hi"}], max_gen_len=1, temperature=0)
            return {"seconds": time.perf_counter() - t}
        # the model module imports lazily: import it before the clock starts, as llama_cpp's
        # `import` above its Llama does (here, where bytecode is not cached, that is 20-40 ms)
        transformer = ellm.Transformer
        before = rss_kb("VmRSS")
        t = time.perf_counter()
        model = transformer.from_pretrained(path, max_seq_len=1024, max_batch_size=1)
        model.forward([[1]])
        out = {"load": time.perf_counter() - t, "rss": (rss_kb("VmHWM") - before) * 1024}
        out["weight_bytes"] = sum(model._engine.weight_bytes())

        def prefill(n):
            ids = np.array([tokens[:n]], dtype=np.int64)
            model._step(ids, 0, all_logits=False)  # the last position's logits, as llama.cpp's eval

        def step(tok, pos):
            model.forward([[tok]], pos)
    else:
        import llama_cpp

        before = rss_kb("VmRSS")
        t = time.perf_counter()
        llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                              verbose=False)
        llm.eval([1])
        out = {"load": time.perf_counter() - t, "rss": (rss_kb("VmHWM") - before) * 1024}

        def prefill(n):
            llm.reset()
            llm.eval(tokens[:n])

        def step(tok, pos):
            llm.eval([tok])
    if task == "load":
        return out
    for n in (128, 512):
        prefill(n)  # warm
        best = min(timed(lambda: prefill(n)) for _ in range(3))
        out[f"prefill{n}"] = n / best
    rates = []
    for _ in range(3):
        prefill(PROMPT)
        t = time.perf_counter()
        for i in range(DECODE_STEPS):
            step(5 + i, PROMPT + i)
        rates.append(DECODE_STEPS / (time.perf_counter() - t))
    out["decode"] = max(rates)
    return out


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def read_pass_gbs(path: str) -> float:
    """A read of the file's bytes, split over the threads (NumPy sums, not ellm's code)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.fromfile(path, dtype=np.uint8)
    data = data[:len(data) // 64 * 64].view(np.uint64)  # integers: no overflow or NaN warnings
    parts = np.array_split(data, THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(np.bitwise_xor.reduce, parts))
        best = min(timed(lambda: list(pool.map(np.bitwise_xor.reduce, parts))) for _ in range(10))
    return data.nbytes / best / 1e9


# ----- the driver -----

def llama_python(build: bool) -> str | None:
    candidates = [os.environ.get("ELLM_LLAMA_CPP_PYTHON"), sys.executable, os.path.join(LLAMA_VENV, "bin", "python")]
    for python in filter(None, candidates):
        if os.path.exists(python) and subprocess.run([python, "-c", "import llama_cpp"],
                                                     capture_output=True).returncode == 0:
            return python
    if not build:
        return None
    print(f"building llama-cpp-python into {LLAMA_VENV} (CMAKE_ARGS={CMAKE_ARGS}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", LLAMA_VENV], check=True)
    python = os.path.join(LLAMA_VENV, "bin", "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-cache-dir", "llama-cpp-python", "numpy"], check=True,
                   env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS})
    return python


def make_files(python: str, bundled: str) -> dict[str, str]:
    os.makedirs(MODELS, exist_ok=True)
    files = {"Q4_1": bundled}
    for name, ftype in FTYPES.items():
        out = os.path.join(MODELS, f"SmolLM2-135M-Instruct.{name}.gguf")
        if not os.path.exists(out):
            script = ("import llama_cpp, sys\n"
                      "p = llama_cpp.llama_model_quantize_default_params()\n"
                      f"p.ftype = {ftype}; p.allow_requantize = True; p.nthread = {THREADS}\n"
                      "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
                      "sys.exit(rc)\n")
            subprocess.run([python, "-c", script, bundled, out], check=True, capture_output=True)
        files[name] = out
    return files


def run(python: str, engine: str, path: str, task: str) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([python, __file__, "--worker", engine, path, task], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} on {path}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", action="store_true", help="build llama-cpp-python if it is not found")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "PATH", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from ellm._bundled import bundled_model_path

    python = llama_python(args.build)
    if python is None:
        print("SKIPPED: llama-cpp-python is not installed. Build it for this CPU (no native build):\n"
              f'  CMAKE_ARGS="{CMAKE_ARGS}" pip install --no-cache-dir llama-cpp-python\n'
              "then set ELLM_LLAMA_CPP_PYTHON to that Python, or run this with --build.")
        return
    files = make_files(python, bundled_model_path())
    results: dict[tuple[str, str], list[dict]] = {}
    loads: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, path in files.items():
            for sample in range(LOAD_SAMPLES):
                for engine, exe in (("ellm", sys.executable), ("llama.cpp", python)):
                    out = run(exe, "ellm" if engine == "ellm" else "llama", path, "model" if sample == 0 else "load")
                    if sample == 0:
                        results.setdefault((name, engine), []).append(out)
                    loads.setdefault((name, engine), []).append(out["load"])
    chat = statistics.median(run(sys.executable, "ellm", "", "chat")["seconds"] for _ in range(args.rounds))

    def med(name, engine, key):
        return statistics.median(r[key] for r in results[(name, engine)])

    rows = []
    for name, path in files.items():
        size = os.path.getsize(path)
        bandwidth = read_pass_gbs(path)
        e = {k: med(name, "ellm", k) for k in ("decode", "prefill128", "prefill512", "rss")}
        c = {k: med(name, "llama.cpp", k) for k in ("decode", "prefill128", "prefill512", "rss")}
        e["load"], c["load"] = (statistics.median(loads[(name, engine)]) for engine in ("ellm", "llama.cpp"))
        weights = med(name, "ellm", "weight_bytes")
        rows.append((name, e, c, size, weights, bandwidth))
    import ellm

    simd = "AVX-512" if "avx512f" in cpu_flags() else "AVX2" if "avx2" in cpu_flags() else "no AVX2"
    print(f"ellm vs llama.cpp, {THREADS} threads, median of {args.rounds} rounds run alternately "
          f"(decode after a {PROMPT}-token prompt; load of {args.rounds * LOAD_SAMPLES} processes each); "
          f"{simd} CPU, ellm's quantized kernels: "
          f"{ellm._backend.require_rust().quant_path()}")
    head = (f"{'file':7} {'decode tok/s':>22} {'prefill128 tok/s':>22} {'prefill512 tok/s':>22} "
            f"{'load to logits s':>22} {'peak RSS / file':>17} {'weights GB/s (read)':>20}")
    print(head)
    print("-" * len(head))
    for name, e, c, size, weights, bandwidth in rows:
        def cell(key, fmt, lower_is_better=False):
            ratio = (c[key] / e[key]) if lower_is_better else (e[key] / c[key])
            return f"{format(e[key], fmt):>7} {format(c[key], fmt):>7} {ratio:5.2f}x"
        achieved = weights * e["decode"] / 1e9
        print(f"{name:7} {cell('decode', '.0f'):>22} {cell('prefill128', '.0f'):>22} {cell('prefill512', '.0f'):>22} "
              f"{cell('load', '.3f', True):>22} {e['rss'] / size:7.2f} {c['rss'] / size:7.2f}  "
              f"{achieved:7.1f} ({bandwidth:5.1f})")
    print("cells: ellm, llama.cpp, ratio (above 1: ellm better). Peak RSS: the process's high-water mark "
          "minus its RSS before loading, over the file size. Weights GB/s: ellm's weight bytes x decode "
          "tok/s, beside a threaded read of the file's bytes in the same run.")
    print(f"ellm.Llama() to a first chat token: {chat:.2f} s (target < 1 s)")


if __name__ == "__main__":
    main()
