"""The `ellm` command: generate, chat, serve, info, metadata."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import EllmError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage plus message
        print(f"ellm: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _progress(iterable):
    from tqdm import tqdm

    # the bar shows only for a load that takes over a second
    return tqdm(iterable, desc="loading", unit="tensor", file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False, delay=1.0)


def _load(args):
    import os

    from .generation import Llama

    path = args.model
    if path is None:
        from ._bundled import bundled_model_path

        path = bundled_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    print(f"ellm: loading {os.path.basename(os.path.normpath(path))}" + (f" ({size / 2**20:.0f} MB)" if size else "")
          + f", weights {'as stored' if args.dtype == 'auto' else 'as ' + args.dtype} ...", file=sys.stderr, flush=True)
    return Llama(path, max_seq_len=args.max_seq_len, max_batch_size=1, progress=_progress, dtype=args.dtype)


def _print_timings(llm) -> None:
    t = llm.model.last_timings
    if not t:
        return
    p_rate = t["prompt_tokens"] / t["prompt_seconds"] if t["prompt_seconds"] else float("nan")
    g_rate = t["generated_tokens"] / t["generate_seconds"] if t["generate_seconds"] else float("nan")
    print(f"\nprompt eval time = {t['prompt_seconds'] * 1000:9.2f} ms / {t['prompt_tokens']:5d} tokens "
          f"({p_rate:8.2f} tokens per second)", file=sys.stderr)
    print(f"       eval time = {t['generate_seconds'] * 1000:9.2f} ms / {t['generated_tokens']:5d} tokens "
          f"({g_rate:8.2f} tokens per second)", file=sys.stderr)


def _emit(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_generate(args) -> int:
    llm = _load(args)
    _emit(llm.generate(args.prompt, max_gen_len=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, stop=args.stop or None, stream=True))
    if args.verbose:
        _print_timings(llm)
    return 0


def cmd_chat(args) -> int:
    llm = _load(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> None:
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in llm.chat_completion(history, temperature=args.temperature, top_p=args.top_p,
                                         max_gen_len=args.max_tokens, seed=args.seed, stream=True):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
        if args.verbose:
            _print_timings(llm)

    if args.message is not None:
        reply(args.message)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model. /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            del history[1 if args.system else 0:]
            print("(history cleared)", file=sys.stderr)
            continue
        reply(text)
    return 0


def cmd_serve(args) -> int:
    try:
        from .serving.server import serve
    except ImportError as exc:
        raise EllmError(str(exc)) from None
    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas is not None and args.ray_plan is not None:
        raise ValueError("--replicas and --ray-plan are two ways to use Ray; choose one")
    how = (f"{args.replicas} replicas on Ray Serve, {args.slots} slots each" if args.replicas is not None else
           f"{args.slots} slots, pipelined over Ray by {args.ray_plan}" if args.ray_plan else f"{args.slots} slots")
    print(f"ellm: serving {args.model or 'the bundled model'} on http://{args.host}:{args.port}/v1 with {how} "
          "(/health answers 503 until the model is loaded)", file=sys.stderr, flush=True)
    options = dict(slots=args.slots, max_seq_len=args.max_seq_len, dtype=args.dtype, api_key=args.api_key,
                   max_queue=args.max_queue)
    if args.replicas is not None:
        try:
            from .distributed.replicas import serve_replicas
        except ImportError as exc:
            raise EllmError(str(exc)) from None
        serve_replicas(args.model, replicas=args.replicas, host=args.host, port=args.port,
                       ray_address=args.ray_address, threads_per_replica=args.threads, **options)
        return 0
    if args.ray_plan is not None and not os.path.isfile(args.ray_plan):
        raise FileNotFoundError(f"no partition plan at {args.ray_plan} (write one with ellm metadata --nodes ... --out)")
    serve(args.model, host=args.host, port=args.port, log_level=args.log_level, ray_plan=args.ray_plan,
          ray_address=args.ray_address, threads=args.threads, **options)
    return 0


def cmd_info(args) -> int:
    from ._backend import get_backend
    from ._bundled import bundled_model_path
    from .hooks import hook_point_names
    from .model import check_layer_count
    from .weights import open_checkpoint

    path = args.model or bundled_model_path()
    ckpt = open_checkpoint(path)
    a = ckpt.args
    if a is None:
        raise EllmError(f"{path}: no config.json beside the weights")
    check_layer_count(a, ckpt.tensors, path)  # before anything walks the declared layers
    a.validate()
    dtypes = sorted({t.dtype for t in ckpt.tensors.values()})
    rows = [
        ("file", path), ("format", ckpt.format), ("stored dtypes", ", ".join(dtypes)),
        ("architecture", a.model_type), ("parameters", f"{a.num_parameters():,}"), ("layers", a.num_hidden_layers),
        ("hidden size", a.hidden_size), ("heads", f"{a.num_attention_heads} (kv {a.num_key_value_heads}, "
                                                  f"head_dim {a.resolved_head_dim})"),
        ("mlp size", a.intermediate_size), ("context length", a.max_position_embeddings),
        ("vocabulary", a.vocab_size), ("rope theta", a.rope_theta), ("compute dtype", "float32"),
        ("backend", get_backend()),
    ]
    for key, value in rows:
        print(f"{key:>15}: {value}")
    if args.hooks:
        print("\nhook points:")
        for name in hook_point_names(a.num_hidden_layers):
            print(f"  {name}")
    return 0


def _parse_nodes(text: str) -> list[dict]:
    nodes = []
    for item in text.split(","):
        parts = item.split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"--nodes takes ID[:SPEED[:MEMORY]],... ; cannot read {item!r}")
        node: dict = {"node_id": parts[0]}
        try:
            if len(parts) > 1 and parts[1]:
                node["relative_speed"] = float(parts[1])
            if len(parts) > 2 and parts[2]:
                node["memory_bytes"] = int(float(parts[2]))
        except ValueError:
            raise ValueError(f"--nodes: speed and memory of {item!r} must be numbers") from None
        nodes.append(node)
    return nodes


def cmd_metadata(args) -> int:
    from ._bundled import bundled_model_path
    from .metadata import generate_metadata, plan_partition

    path = args.model or bundled_model_path()
    nodes = _parse_nodes(args.nodes) if args.nodes else None
    meta = generate_metadata(path, batch_size=args.batch_size, sequence_length=args.sequence_length,
                             node_id=args.node_id, kv_cache_dtype=args.kv_cache_dtype)
    out = meta.to_dict()
    print(f"{'block':<10} {'params':>12} {'weight bytes':>14} {'GFLOP prefill':>14} {'MFLOP decode':>13} "
          f"{'KV bytes':>12}", file=sys.stderr)
    for b in meta.blocks:
        print(f"{b.name:<10} {b.params:>12,} {b.weight_bytes:>14,} {b.flops_prefill / 1e9:>14.2f} "
              f"{b.flops_decode / 1e6:>13.2f} {b.kv_cache_bytes:>12,}", file=sys.stderr)
    t = meta.totals
    print(f"{'total':<10} {t['params']:>12,} {t['weight_bytes']:>14,} {t['flops_prefill'] / 1e9:>14.2f} "
          f"{t['flops_decode'] / 1e6:>13.2f} {t['kv_cache_bytes']:>12,}", file=sys.stderr)
    if nodes:
        plan = plan_partition(meta, nodes)
        out["partition"] = plan.to_dict()
        for n in plan.nodes:
            span = f"{n.blocks[0]} .. {n.blocks[-1]}" if n.blocks else "(nothing)"
            print(f"node {n.node_id}: {span} ({len(n.blocks)} blocks, {n.weight_bytes:,} weight bytes)", file=sys.stderr)
    import json

    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ellm", description="Run Llama-family models on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_options(p):
        p.add_argument("--model", help="a Hugging Face folder or a .gguf file (default: the bundled SmolLM2-135M-Instruct)")
        p.add_argument("--max-seq-len", type=int, default=2048, help="context length to allocate (default 2048)")
        p.add_argument("--dtype", default="auto", choices=["auto", "f32", "q8_0", "q4_0"],
                       help="how to keep the weights: auto (as stored, the default), f32, or quantized to q8_0/q4_0")
        p.add_argument("--verbose", action="store_true", help="print timings afterwards")

    def sampling_options(p, max_tokens):
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        p.add_argument("--temperature", type=float, default=0.6)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="continue a text prompt")
    g.add_argument("prompt")
    model_options(g)
    sampling_options(g, 128)
    g.add_argument("--stop", nargs="+", default=[], help="stop strings")
    g.set_defaults(run=cmd_generate)

    c = sub.add_parser("chat", help="chat with the model (one message, or interactive)")
    c.add_argument("message", nargs="?")
    c.add_argument("--system", help="a system prompt")
    model_options(c)
    sampling_options(c, 256)
    c.set_defaults(run=cmd_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the extra ellm[server])")
    s.add_argument("model", nargs="?", help="a Hugging Face folder or a .gguf file (default: the bundled model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=4, help="requests generating at once, one KV slot each (default 4)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    s.add_argument("--max-seq-len", type=int, default=2048, help="context length of each slot (default 2048)")
    s.add_argument("--dtype", default="auto", choices=["auto", "f32", "q8_0", "q4_0"])
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--ray-plan", metavar="PLAN.json",
                   help="split the model into pipeline stages over Ray nodes by this partition plan "
                        "(ellm metadata --nodes ... --out PLAN.json; needs ellm[ray])")
    s.add_argument("--replicas", type=int, help="serve N engine replicas behind one endpoint on Ray Serve "
                                                "(needs ellm[ray])")
    s.add_argument("--ray-address", help="the Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    s.add_argument("--threads", type=int, help="threads of the engine (of each replica with --replicas, of each "
                                               "stage with --ray-plan); default: every core")
    s.set_defaults(run=cmd_serve)

    i = sub.add_parser("info", help="describe a model")
    i.add_argument("--model")
    i.add_argument("--hooks", action="store_true", help="list the hook points")
    i.set_defaults(run=cmd_info)

    m = sub.add_parser("metadata", help="per-layer parameters, compute and memory as JSON")
    m.add_argument("model", nargs="?", help="a Hugging Face folder, .safetensors or .gguf (default: the bundled model)")
    m.add_argument("--batch-size", type=int, default=1)
    m.add_argument("--sequence-length", type=int, default=512)
    m.add_argument("--node-id")
    m.add_argument("--kv-cache-dtype", choices=["f32", "f16"], default="f32",
                   help="what the KV cache holds (an engine keeping quantized weights picks f16)")
    m.add_argument("--out", help="write the JSON here instead of stdout")
    m.add_argument("--nodes", help="plan a split over nodes: ID[:SPEED[:MEMORY_BYTES]],...")
    m.set_defaults(run=cmd_metadata)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (EllmError, ValueError, TypeError, OSError, MemoryError, FloatingPointError, RuntimeError) as exc:
        print(f"ellm: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
