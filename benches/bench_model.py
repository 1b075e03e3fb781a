"""The engine on the bundled model (f32), 2 threads, one run, one table: decode speed and
effective weight bandwidth beside the machine's measured read bandwidth, prefill GFLOPS beside
what ops.linear reaches, Rust against NumPy, hook overhead, peak RSS after loading."""

import os
import resource
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from _common import best_of, table  # noqa: E402

import numpy as np  # noqa: E402

import ellm  # noqa: E402
from ellm import HookRegistry, Transformer, ops  # noqa: E402
from ellm._bundled import bundled_model_path  # noqa: E402

THREADS = int(os.environ["RAYON_NUM_THREADS"])


def read_bandwidth_gbs() -> float:
    """A STREAM-like read of a 1 GiB array: the faster of a threaded np.sum and OpenBLAS's
    matrix-vector product over the same bytes (neither is ellm's code)."""
    a = np.random.default_rng(0).random(1 << 28, dtype=np.float32)
    parts = np.array_split(a, THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        t_sum = best_of(lambda: list(pool.map(np.sum, parts)), repeat=5, min_time=0.2)
    matrix, vector = a.reshape(-1, 1024), np.ones(1024, dtype=np.float32)
    t_gemv = best_of(lambda: matrix @ vector, repeat=5, min_time=0.2)
    return a.nbytes / min(t_sum, t_gemv) / 1e9


def decode_rate(model, prompt, steps, repeat=3):
    """Best decode tokens/s over `repeat` generations (after a warm-up), like best_of."""
    model.generate([prompt], steps, temperature=0, stop_tokens=[])
    rates = []
    for _ in range(repeat):
        model.generate([prompt], steps, temperature=0, stop_tokens=[])
        t = model.last_timings
        rates.append(t["generated_tokens"] / t["generate_seconds"])
    return max(rates)


def linear_gflops_on_layer_shapes(a, n):
    """What ops.linear reaches on one decoder layer's seven projections for n tokens."""
    h, q, kv, i = a.hidden_size, a.q_dim(), a.kv_dim(), a.intermediate_size
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    rng = np.random.default_rng(0)
    inputs = {k: rng.random((n, k), dtype=np.float32) for k in {h, q, i}}
    weights = [rng.random(s, dtype=np.float32) for s in shapes]
    t = best_of(lambda: [ops.linear(inputs[w.shape[1]], w) for w in weights], repeat=5)
    return sum(2 * n * o * k for o, k in shapes) / t / 1e9


def prefill_seconds(model, n):
    tokens = np.arange(n, dtype=np.int64)[None, :] % 1000 + 100
    return best_of(lambda: model._step(tokens, 0, all_logits=False), repeat=3, min_time=0.1)


def peak_rss_loading_f32_safetensors(gguf_path, args) -> int:
    """Write the bundled model as an f32 safetensors folder, load it in a fresh process, and
    return that process's peak RSS in bytes."""
    import json
    import subprocess
    import tempfile

    from safetensors.numpy import save_file

    from ellm.weights import open_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        ckpt = open_checkpoint(gguf_path)
        save_file({n: ckpt.load(n) for n in args.expected_shapes()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump(args.to_dict(), fh)
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's high-water mark
        code = ("import ellm; m = ellm.Transformer.from_pretrained(%r, max_seq_len=128, max_batch_size=1); "
                "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
                % folder)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())


def main():
    path = bundled_model_path()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = Transformer.from_pretrained(path, max_seq_len=1024, max_batch_size=1)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    a = model.model_args
    weight_bytes = a.num_parameters() * 4
    # per token every matrix is read once; the tied embedding is read whole as the output head
    read_per_token = weight_bytes - a.hidden_size * a.vocab_size * 4 * (0 if a.tie_word_embeddings else 1)
    prompt = (np.arange(128) % 1000 + 100).tolist()
    rows = []

    bandwidth = read_bandwidth_gbs()
    rust_tps = decode_rate(model, prompt, 32)
    eff = rust_tps * read_per_token / 1e9
    rows.append(("decode tokens/s (batch 1, after 128)", f"{rust_tps:.1f}", ""))
    rows.append(("effective weight bandwidth GB/s", f"{eff:.1f}", f"{eff / bandwidth:.0%} of read bw, target >= 80%"))
    rows.append(("measured read bandwidth GB/s", f"{bandwidth:.1f}", f"{THREADS} threads, 1 GiB"))

    matmul_flops_per_token = 2 * (a.num_parameters() - a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
                                  - a.hidden_size * (2 * a.num_hidden_layers + 1))
    for n in (128, 512):
        t = prefill_seconds(model, n)
        attn = 2 * 2 * a.num_hidden_layers * a.num_attention_heads * a.resolved_head_dim * n * (n + 1) / 2
        head = 2 * a.hidden_size * a.vocab_size
        gflops = (matmul_flops_per_token * n + attn + head) / t / 1e9
        lin = linear_gflops_on_layer_shapes(a, n)
        rows.append((f"prefill {n} tokens: tokens/s", f"{n / t:.0f}",
                     f"{gflops:.1f} GFLOPS = {gflops / lin:.0%} of ops.linear on the layer shapes ({lin:.1f}), target >= 70%"))

    # hooks: no registry against an empty registry, interleaved to share the noise
    empty = HookRegistry()
    plain, hooked = [], []
    for _ in range(3):
        model.set_hook_registry(None)
        plain.append(decode_rate(model, prompt[:16], 24))
        model.set_hook_registry(empty)
        hooked.append(decode_rate(model, prompt[:16], 24))
    model.set_hook_registry(None)
    rows.append(("decode with an empty HookRegistry", f"{max(hooked):.1f}",
                 f"{max(hooked) / max(plain):.1%} of no registry ({max(plain):.1f}), target >= 98%"))

    ellm.set_backend("numpy")
    ref = Transformer.from_pretrained(path, max_seq_len=1024, max_batch_size=1)
    numpy_tps = decode_rate(ref, prompt, 8, repeat=2)
    del ref
    ellm.set_backend("rust")
    rows.append(("NumPy backend decode tokens/s", f"{numpy_tps:.1f}", f"Rust is {rust_tps / numpy_tps:.1f}x, target >= 10x"))
    rows.append(("peak RSS loading the GGUF (MB)", f"{rss_after / 1e6:.0f}",
                 f"{rss_after / weight_bytes:.2f}x the f32 weights ({weight_bytes / 1e6:.0f} MB; "
                 f"{rss_before / 1e6:.0f} MB before loading)"))
    peak = peak_rss_loading_f32_safetensors(path, a)
    rows.append(("peak RSS loading f32 safetensors (MB)", f"{peak / 1e6:.0f}",
                 f"{peak / weight_bytes:.2f}x the f32 weights, target < 1.3x (fresh process)"))
    table(f"bench_model: bundled SmolLM2-135M as f32, RAYON_NUM_THREADS={THREADS}", ["measure", "value", "note"], rows)


if __name__ == "__main__":
    main()
