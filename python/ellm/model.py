"""Transformer: a Llama-family decoder with a KV cache, on the Rust engine or the NumPy model.

The API follows Meta's llama `model.py`/`generation.py` (`forward(tokens, start_pos)`,
`generate(prompt_tokens, ...)`) with Hugging Face config and weight names.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ._backend import get_backend
from .batch_rules import check_token_ids
from .config import KV_CACHE_DTYPES, ModelArgs
from .errors import ModelBusyError, ModelFormatError
from . import hooks as H
from .hooks import HookRegistry, hook_point_names
from .sampling import apply_repetition_penalty, log_softmax, sample
from .stage import Stage


def _as_float32(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
    try:
        return np.require(np.asarray(value, dtype=np.float32), requirements=["C", "A"])
    except (TypeError, ValueError) as exc:
        raise TypeError(f"weight {name!r} is not an array: {exc}") from None


def _weight(value: Any, name: str, allow_non_finite: bool) -> np.ndarray:
    """A tensor as the float32 array the engines take, refusing NaN and infinite values unless allowed."""
    array = _as_float32(value, name)
    # a float64 sum is finite exactly when every value is (float32 values cannot overflow it)
    if not allow_non_finite and array.size and not np.isfinite(np.sum(array, dtype=np.float64)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ModelFormatError(f"weight {name!r} holds {bad} NaN or infinite values (a corrupt file? GGUF and "
                               "safetensors carry no checksum); pass allow_non_finite=True to load it anyway")
    return array


# How from_pretrained may keep the weight matrices ("float32" is "f32").
WEIGHT_DTYPES = ("auto", "f32", "float32", "q8_0", "q4_0")


def _shape_of(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in (shape if shape is not None else np.shape(value)))


def as_token_array(sequences: Any) -> np.ndarray:
    """A rectangular `[batch, seq]` int64 array of token ids (a single list is one sequence)."""
    if isinstance(sequences, np.ndarray):
        arr = sequences
    else:
        seqs = list(sequences)
        if seqs and not isinstance(seqs[0], (list, tuple, np.ndarray)):
            seqs = [seqs]
        lengths = {len(s) for s in seqs}
        if len(lengths) > 1:
            raise ValueError(f"sequences must all have the same length for forward, got lengths {sorted(lengths)}")
        arr = np.array(seqs)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [batch, seq] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _index_array(values: Any, name: str) -> np.ndarray:
    """A 1-d int64 array of ids, slots or positions, refusing floats and negatives."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-d sequence of ints, got {arr.dtype} of shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {int(arr.min())}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _prompt_ids(prompt: Any) -> list[int]:
    """A prompt's token ids, refusing what `forward` refuses (floats, bools, strings)."""
    ids = list(prompt)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"token ids must be integers, got {t!r}")
    return [int(t) for t in ids]


def check_layer_count(args: ModelArgs, tensors: Mapping[str, Any], path: Any) -> None:
    """A config's layer count against the layers the file holds, before anything loops over them."""
    present = {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if args.num_hidden_layers != len(present) or (present and max(present) != len(present) - 1):
        raise ModelFormatError(f"{path}: the config declares {args.num_hidden_layers} layers, the file holds "
                               f"{len(present)} (numbered up to {max(present, default=-1)})")


def _ignorable(name: str, args: ModelArgs) -> bool:
    """Tensors a checkpoint may hold that carry no weights of their own, as transformers skips
    them: old saves' rope buffers, and an output head tied to the embedding."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_word_embeddings)


class Transformer:
    """A Llama-family decoder. Build with `Transformer(args)` and `load_state_dict`, or with
    `Transformer.from_pretrained(path)` (a Hugging Face folder or a .gguf file).

    Threads: a model runs one call at a time. `forward` holds it for one step and `generate` (and
    each `generate_steps` stream) for the whole generation, since a generation owns the KV cache
    from its first step to its last; calls from other threads wait their turn, with the GIL
    released. The same thread starting a second generation before its first one ends, or calling
    the model from one of its own hooks, gets `ModelBusyError`. Different models run in parallel.
    A step that fails (a hook's exception, Ctrl-C) leaves the KV cache as it was.

    Given a `Stage`, the model is one pipeline stage of a model split over machines
    (`ellm.distributed`): it holds that stage's tensors only, and its `step` takes hidden states
    where the stage does not embed and returns them where it does not apply the head."""

    def __init__(self, args: ModelArgs, stage: Stage | None = None) -> None:
        if not isinstance(args, ModelArgs):
            raise TypeError(f"Transformer takes a ModelArgs, got {type(args).__name__}")
        if stage is not None and not isinstance(stage, Stage):
            raise TypeError(f"stage must be an ellm.stage.Stage or None, got {type(stage).__name__}")
        args.validate()
        if stage is not None and stage.stop > args.num_hidden_layers:
            raise ValueError(f"stage layers {stage.first}..{stage.stop - 1} pass the model's "
                             f"{args.num_hidden_layers} layers")
        self.model_args = args
        self.stage = stage or Stage.whole(args)
        self.backend = get_backend()
        self.weights_loaded = False
        self.source: str | None = None
        self.dtype = "f32"  # how the weights are kept (from_pretrained's dtype)
        self._gguf_metadata = None
        self._engine = self._new_engine()
        self._registry: HookRegistry | None = None
        self._prefix = ""
        self.last_timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None        # thread holding the model
        self._hook_thread: int | None = None  # thread running one of its hooks
        self._allocated: set[int] = set()      # KV slots claimed with allocate_slot
        self._cache_epoch = 0

    @property
    def config(self) -> ModelArgs:
        return self.model_args

    def _new_engine(self):
        if self.backend == "rust":
            from . import _lowlevel

            return _lowlevel.LlamaEngine(self.stage.engine_config(self.model_args))
        from .numpy_backend.llama import NumpyLlama

        return NumpyLlama(self.model_args, self.stage)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model: wait for another thread's call to finish; refuse the same thread."""
        me = threading.get_ident()
        if me == self._hook_thread:
            raise ModelBusyError("the model was called from one of its own hooks while running a step; "
                                 "a hook may look at tensors but not run the model")
        if me == self._owner:
            raise ModelBusyError("this thread is already running a generation on this model (an unfinished "
                                 "stream?): finish or close it first, or use another model")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # ----- loading -----

    def _install(self, tensors: Iterable[tuple[str, Callable[[], Any]]], allow_non_finite: bool = False,
                 put: Callable[[Any, str], bool] | None = None) -> None:
        """Fill a new engine tensor by tensor; swap it in only when every tensor went in. `put`,
        where given, may place a tensor itself (kept as stored) and returns whether it did."""
        engine = self._new_engine()
        for name, get in tensors:
            if put is not None and put(engine, name):
                continue
            array = _weight(get(), name, allow_non_finite)
            engine.set_weight(name, array)
            del array
        engine.check_loaded()
        with self._exclusive():
            self._engine = engine
            self.weights_loaded = True

    def _update(self, tensors: dict[str, Any], allow_non_finite: bool = False) -> None:
        """Replace some tensors of the current engine (all converted first, so a bad one changes
        nothing); the others, and the KV cache, stay."""
        arrays = {name: _weight(value, name, allow_non_finite) for name, value in tensors.items()}
        with self._exclusive():
            for name, array in arrays.items():
                self._engine.set_weight(name, array)
            try:
                self._engine.check_loaded()
                self.weights_loaded = True
            except ValueError:
                self.weights_loaded = False

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, *,
                        allow_non_finite: bool = False) -> None:
        """Load Hugging Face-named tensors (NumPy arrays, torch tensors, anything with __array__).
        With strict=False a subset updates only those tensors. A tensor holding NaN or infinite
        values is refused with its name unless allow_non_finite. On any error the previous weights
        stay in place. A pipeline stage takes the whole model's state dict and keeps its own tensors."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        expected = self.model_args.expected_shapes()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if not self.stage.is_whole:
            if missing and not strict:
                raise ValueError("a pipeline stage loads a whole state dict (strict); update its tensors with another "
                                 "stage built from the new weights")
            held = self.stage.tensor_names(self.model_args)  # stage name -> model name
            state_dict = {local: state_dict[name] for local, name in held.items() if name in state_dict}
            expected = {local: expected[name] for local, name in held.items()}
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(unexpected)}")
            raise ValueError("load_state_dict: " + "; ".join(parts))
        for name in expected:
            if name in state_dict and _shape_of(state_dict[name]) != expected[name]:
                raise ValueError(f"load_state_dict: {name!r} has shape {_shape_of(state_dict[name])}, "
                                 f"expected {expected[name]}")
        if missing:  # strict=False with a subset: update those tensors, keep every other one
            self._update({n: state_dict[n] for n in expected if n in state_dict}, allow_non_finite)
        else:
            self._install(((n, lambda n=n: state_dict[n]) for n in expected), allow_non_finite)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "auto", max_seq_len: int | None = None,
                        max_batch_size: int | None = None, progress: Callable | None = None,
                        allow_non_finite: bool = False, stage: Stage | None = None,
                        kv_cache_dtype: str = "auto") -> Transformer:
        """Load a Hugging Face folder (config.json + safetensors) or a .gguf file.

        `dtype` says how the Rust engine keeps the weight matrices: "auto" as stored (a GGUF's
        quantized blocks, multiplied as they are; a folder's f32, f16 or bf16), "f32" expanded,
        "q8_0" or "q4_0" with f32/f16/bf16 matrices quantized on load (already quantized ones
        stay as stored). Norm vectors are always f32. The NumPy backend always computes in f32.

        `kv_cache_dtype` is what the KV cache holds: "f32", "f16" (half the bytes each step's
        attention reads; llama.cpp's default), or "auto": f16 where the Rust engine keeps the
        weight matrices in fewer bits than f32 (quantized blocks, f16, bf16), else f32.

        `progress`, if given, wraps the iterable of tensor names (e.g. `tqdm`). A tensor holding
        NaN or infinite values is refused, naming it, unless allow_non_finite. (Other flipped
        bytes in the weights cannot be detected: GGUF and safetensors carry no checksum.)

        With a `stage`, only that pipeline stage's tensors are read (the whole file's headers are
        still checked), so a stage never holds the rest of the model."""
        from .weights import open_checkpoint

        if not isinstance(dtype, str) or dtype.lower() not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, WEIGHT_DTYPES))}, got {dtype!r}")
        dtype = dtype.lower()
        if not isinstance(kv_cache_dtype, str) or kv_cache_dtype.lower() not in ("auto", *KV_CACHE_DTYPES):
            raise ValueError(f"kv_cache_dtype must be one of 'auto', {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {kv_cache_dtype!r}")
        kv_cache_dtype = kv_cache_dtype.lower()
        ckpt = open_checkpoint(path)
        if ckpt.args is None:
            raise ModelFormatError(f"{path}: no config.json beside the weights, so the model's shape is unknown")
        args = ckpt.args
        if max_batch_size is not None:
            args.max_batch_size = max_batch_size
        args.max_seq_len = min(max_seq_len, args.max_position_embeddings) if max_seq_len else args.max_seq_len
        if kv_cache_dtype == "auto":
            narrow = dtype in ("q8_0", "q4_0") or (dtype == "auto" and any(
                len(t.shape) == 2 and t.dtype != "F32" for t in ckpt.tensors.values()))
            kv_cache_dtype = "f16" if narrow and get_backend() == "rust" else "f32"
        args.kv_cache_dtype = kv_cache_dtype
        check_layer_count(args, ckpt.tensors, path)
        try:
            args.validate()
        except ModelFormatError:
            raise
        except ValueError as exc:
            raise ModelFormatError(f"{path}: {exc}") from None
        expected = args.expected_shapes()
        missing = [n for n in expected if n not in ckpt.tensors]
        if missing:
            raise ModelFormatError(f"{path}: tensors missing: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        unexpected = [n for n in ckpt.tensors if n not in expected and not _ignorable(n, args)]
        if unexpected:
            raise ModelFormatError(f"{path}: tensors this {args.model_type} config has no place for (ellm does not "
                                   f"drop weights it was given): {', '.join(unexpected[:8])}"
                                   + (" ..." if len(unexpected) > 8 else ""))
        for name, shape in expected.items():
            if ckpt.tensors[name].shape != shape:
                raise ModelFormatError(f"{path}: tensor {name!r} has shape {ckpt.tensors[name].shape}, expected {shape}")
        model = cls(args, stage)  # the engine and its cache are built only once the tensors fit the config
        held = model.stage.tensor_names(args)  # engine name -> file name
        names: Iterable[str] = list(held)
        if progress is not None:
            names = progress(names)
        put = None
        if model.backend == "rust" and dtype not in ("f32", "float32"):
            def put(engine, name: str) -> bool:
                stored = held[name]
                if len(expected[stored]) != 2:
                    return False  # vectors go in as checked float32
                if ckpt.load_into is not None and ckpt.load_into(engine, stored, dtype, allow_non_finite, name):
                    return True
                if dtype in ("q8_0", "q4_0"):
                    engine.set_weight(name, _weight(ckpt.load(stored), stored, allow_non_finite), dtype)
                    return True
                return False
        model._install(((n, lambda n=n: ckpt.load(held[n])) for n in names), allow_non_finite, put)
        model.dtype = dtype if model.backend == "rust" else "f32"
        if ckpt.format == "gguf":
            model._gguf_metadata = ckpt.contents.metadata  # for Llama's tokenizer, taken once
        model.source = os.fspath(path)
        return model

    # ----- hooks -----

    def set_hook_registry(self, registry: HookRegistry | None, prefix: str = "") -> None:
        """Fire the registry's hooks during forward and generate; with a prefix every point fires
        as `prefix + "_" + name`. None removes the registry."""
        if registry is not None and not isinstance(registry, HookRegistry):
            raise TypeError(f"expected a HookRegistry or None, got {type(registry).__name__}")
        self._registry = registry
        self._prefix = prefix

    def hook_points(self) -> list[str]:
        """Every hook point name this model fires."""
        return hook_point_names(self.model_args.num_hidden_layers)

    def _public_name(self, point: str) -> str:
        return f"{self._prefix}_{point}" if self._prefix else point

    def _hook_args(self) -> tuple[Callable | None, set[str] | None]:
        registry = self._registry
        if registry is None or not registry.has_hooks():
            return None, None
        enabled = {p for p in self.hook_points() if registry.matching([self._public_name(p)])}
        if not enabled:
            return None, None

        def call(point: str, tensor: np.ndarray, layer: int) -> None:
            self._hook_thread = threading.get_ident()
            try:
                registry.call_hook(self._public_name(point), tensor, layer)
            finally:
                self._hook_thread = None

        return call, enabled

    # ----- running -----

    def _require_weights(self) -> None:
        if not self.weights_loaded:
            raise ValueError("the model has no weights: call load_state_dict or use Transformer.from_pretrained")

    def _require_whole(self, what: str) -> None:
        if not self.stage.is_whole:
            s = self.stage
            raise ValueError(f"{what} needs the whole model; this is a pipeline stage of layers {s.first}..{s.stop - 1} "
                             "(run it with step, or use ellm.distributed.PipelineModel)")

    def _check_tokens(self, tokens: np.ndarray, start_pos: int) -> None:
        a = self.model_args
        self._require_weights()
        if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
            raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
        batch, seq = tokens.shape
        if batch > a.max_batch_size:
            raise ValueError(f"batch of {batch} exceeds max_batch_size {a.max_batch_size}")
        if start_pos + seq > a.max_seq_len:
            raise ValueError(f"start_pos {start_pos} + {seq} tokens exceeds max_seq_len {a.max_seq_len}")
        check_token_ids(tokens, a.vocab_size)

    def _step(self, tokens: np.ndarray, start_pos: int, all_logits: bool) -> np.ndarray:
        """One engine call; the caller holds the model."""
        self._check_tokens(tokens, start_pos)
        hook, names = self._hook_args()
        return self._engine.forward(tokens, int(start_pos), all_logits, hook, names)

    def _step_rows(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """One ragged engine call; the caller holds the model."""
        hook, names = self._hook_args()
        return self._engine.step(tokens, slots, positions, wanted, hook, names)

    def forward(self, sequences: Any, start_pos: int = 0) -> np.ndarray:
        """Logits `[batch, seq, vocab]` (float32) of every position; sequence b's tokens sit at
        positions start_pos.. and the KV cache keeps them for later calls."""
        tokens = as_token_array(sequences)
        self._require_whole("forward")
        with self._exclusive():
            self._claim_rows(len(tokens))
            return self._step(tokens, start_pos, all_logits=True)

    __call__ = forward

    # ----- KV slots and ragged steps (the serving engine's interface) -----

    @property
    def num_slots(self) -> int:
        """KV slots: one sequence each (max_batch_size of them)."""
        return self.model_args.max_batch_size

    def step(self, tokens: Any, slots: Any, positions: Any, logits: Any | None = None) -> np.ndarray:
        """One ragged step, llama.cpp's `llama_batch`: row r is token `tokens[r]` of the sequence in KV
        slot `slots[r]` at position `positions[r]`. Decode tokens of some slots and prompt chunks of
        others go through the weights together. A slot's rows are adjacent, at consecutive positions
        starting at or before `slot_length(slot)` (a step may rewrite a slot's tail). Returns the
        logits `[rows where logits[r], vocab]` (default: every row).

        A pipeline stage after the first takes, instead of token ids, the hidden states `[rows,
        hidden_size]` the stage before returned; a stage before the last returns the hidden states
        of every row."""
        if self.stage.embeds:
            tokens = _index_array(tokens, "tokens")
        else:
            tokens = np.ascontiguousarray(_as_float32(tokens, "hidden states"))
            if tokens.ndim != 2:
                raise ValueError(f"this stage takes hidden states [rows, {self.model_args.hidden_size}], "
                                 f"got shape {tokens.shape}")
        wanted = np.ones(len(tokens), bool) if logits is None else np.asarray(logits, dtype=bool).reshape(-1)
        self._require_weights()
        hook, names = self._hook_args()
        with self._exclusive():  # the engine checks the rows (counts, slots, positions, ids)
            return self._engine.step(tokens, _index_array(slots, "slots"), _index_array(positions, "positions"),
                                     wanted, hook, names)

    def slot_length(self, slot: int) -> int:
        """How many positions KV slot `slot` holds."""
        self._check_slot(slot)
        return int(self._engine.slot_lengths()[slot])

    def allocate_slot(self, slot: int | None = None) -> int:
        """Claim a KV slot for a sequence driven by `step`: `slot` if given, else the first free one.
        Its cached positions stay (truncate or clear it as needed). ValueError when it is taken or
        none is free. `forward` and `generate` use slots 0..batch-1 and refuse to run over a claimed one."""
        with self._lock:
            free = [s for s in range(self.num_slots) if s not in self._allocated]
            if slot is not None:
                self._check_slot(slot)
                if slot not in free:
                    raise ValueError(f"KV slot {slot} is already allocated")
                free = [int(slot)]
            if not free:
                raise ValueError(f"all {self.num_slots} KV slots are in use (max_batch_size)")
            self._allocated.add(free[0])
            return free[0]

    def free_slot(self, slot: int) -> None:
        """Give a slot back (its cached positions stay until it is cleared or reused)."""
        self._check_slot(slot)
        self._allocated.discard(slot)

    @property
    def cache_epoch(self) -> int:
        """Counts the calls (`forward`, `generate`, `reset_cache`) that wrote slots outside `step`,
        so a slot's owner can tell its cached positions may have changed."""
        return self._cache_epoch

    def _claim_rows(self, batch: int) -> None:
        """forward and generate write slots 0..batch-1: refuse where `step` users hold one, else count
        the write in `cache_epoch`."""
        taken = sorted(s for s in self._allocated if s < batch)
        if taken:
            raise ModelBusyError(f"KV slots {taken} are allocated to step users (a serving engine?); forward and "
                                 f"generate write slots 0..{batch - 1}: use a smaller batch or another model")
        self._cache_epoch += 1

    def clear_slot(self, slot: int) -> None:
        """Empty a slot."""
        self.truncate_slot(slot, 0)

    def truncate_slot(self, slot: int, n: int) -> None:
        """Keep the first n positions of a slot (a prompt's shared prefix reused by the next request)."""
        self._check_slot(slot)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        with self._exclusive():
            self._engine.truncate_slot(int(slot), int(n))

    def copy_slot(self, src: int, dst: int, n: int | None = None) -> None:
        """Make slot dst hold the first n positions of slot src (all of them by default)."""
        self._check_slot(src)
        self._check_slot(dst)
        with self._exclusive():
            held = int(self._engine.slot_lengths()[src])
            self._engine.copy_slot(int(src), int(dst), held if n is None else int(n))

    def _check_slot(self, slot: Any) -> None:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in 0..{self.num_slots - 1}, got {slot!r}")

    def weight_types(self) -> dict[str, str]:
        """How each weight matrix is stored: name -> "F32", "F16", "BF16", "Q4_1", ...
        (always "F32" on the NumPy backend, which computes in f32)."""
        if self.backend == "rust":
            return dict(self._engine.weight_types())
        return {n: "F32" for n, s in self.stage.expected_shapes(self.model_args).items() if len(s) == 2}

    def reset_cache(self) -> None:
        """Empty every KV slot."""
        with self._exclusive():
            self._cache_epoch += 1
            self._engine.reset_cache()

    def _non_finite_report(self, rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> str:
        """Runs the failed step (tokens, slots, positions, logits flags) again with every layer's
        output watched, to name where the values first stopped being finite (the step rewrites the
        same cache positions)."""
        first: list[str] = []

        def watch(point: str, tensor: np.ndarray, layer: int) -> None:
            if not first and not np.isfinite(tensor).all():
                first.append(point)

        names = {H.EMBED_TOKENS, H.FINAL_NORM} | {H.layer_point(i, p) for i in range(self.model_args.num_hidden_layers)
                                                  for p in (H.ATTENTION_OUTPUT, H.MLP_OUTPUT, H.OUTPUT)}
        self._engine.step(*rows, watch, names)
        where = f"first at {first[0]}" if first else "only in the output head"
        positions = rows[2]
        return (f"the model produced NaN or infinite logits at positions {int(positions.min())}..{int(positions.max())} "
                f"({where}); its weights or inputs hold non-finite or overflowing values")

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: int | None = None,
        stop_tokens: Iterable[int] | None = None,
        repetition_penalty: float = 1.0,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Meta's `Llama.generate`: ragged prompts batched, stop at an eos id or a stop token.

        Returns (tokens, logprobs or None), one list per prompt."""
        steps = self.generate_steps(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, seed,
                                    stop_tokens, repetition_penalty)
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value

    def generate_steps(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: int | None = None,
        stop_tokens: Iterable[int] | None = None,
        repetition_penalty: float = 1.0,
    ) -> Generator[np.ndarray, None, tuple[list[list[int]], list[list[float]] | None]]:
        """`generate` one step at a time: yields the ids chosen at each step (-1 for a sequence
        that has finished) and returns what `generate` returns. Streaming uses it."""
        with self._exclusive():
            return (yield from self._generate_steps(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs,
                                                    echo, seed, stop_tokens, repetition_penalty))

    def _generate_steps(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, seed, stop_tokens,
                        repetition_penalty):
        self._require_whole("generate")
        a = self.model_args
        prompts = [_prompt_ids(p) for p in prompt_tokens]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one non-empty prompt")
        if max_gen_len is None:
            max_gen_len = a.max_seq_len - 1
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, (int, np.integer)):
            raise TypeError(f"max_gen_len must be an int or None, got {max_gen_len!r}")
        if len(prompts) > a.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size {a.max_batch_size}")
        self._claim_rows(len(prompts))
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        max_len = max(map(len, prompts))
        if max_len > a.max_seq_len or (max_len == a.max_seq_len and max_gen_len > 0):
            raise ValueError(f"a prompt of {max_len} tokens with max_seq_len {a.max_seq_len} leaves no room to "
                             "generate")
        check_token_ids(np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts]), a.vocab_size)
        n = len(prompts)
        lengths = np.array([len(p) for p in prompts])
        limits = np.minimum(a.max_seq_len, lengths + max_gen_len)  # each sequence's last length
        tokens = np.zeros((n, int(limits.max())), dtype=np.int64)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        token_logprobs = np.zeros(tokens.shape, dtype=np.float64)
        stops = set(a.eos_token_id or []) | set(stop_tokens or [])
        stop_array = np.array(sorted(stops), dtype=np.int64)
        done = lengths >= limits
        rng = np.random.default_rng(seed)
        self.last_timings = {"prompt_tokens": int(lengths.sum()), "prompt_seconds": 0.0,
                             "generated_tokens": 0, "generate_seconds": 0.0}
        started = time.perf_counter()

        # First every prompt at its own length in one ragged step, then one token per sequence per step.
        if done.all() and not logprobs:
            return [list(p) if echo else [] for p in prompts], None
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
        slots = np.repeat(np.arange(n), lengths)
        positions = np.concatenate([np.arange(len(p)) for p in prompts])
        last_rows = np.cumsum(lengths) - 1
        wanted = np.ones(len(ids), bool) if logprobs else np.isin(np.arange(len(ids)), last_rows)
        cur = lengths.copy()  # the position each sequence's next token goes to
        live = np.arange(n)
        prompt_step = True
        while True:
            rows = (ids, slots, positions, wanted)
            logits = self._step_rows(*rows)
            if logprobs and prompt_step:  # score every prompt token
                lp = log_softmax(logits)
                for b, p in enumerate(prompts):
                    first = last_rows[b] - len(p) + 1
                    token_logprobs[b, 1:len(p)] = lp[first:last_rows[b], :][np.arange(len(p) - 1), p[1:]]
                logits = logits[last_rows]
            if done.all():  # max_gen_len 0: the prompt step was for its logprobs only
                break
            if not np.isfinite(logits).all():
                raise FloatingPointError(self._non_finite_report(rows))
            if repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, [tokens[b, :cur[b]] for b in live], repetition_penalty)
            chosen = sample(logits, temperature, top_p, top_k, rng)
            tokens[live, cur[live]] = chosen
            if logprobs:
                token_logprobs[live, cur[live]] = log_softmax(logits)[np.arange(len(live)), chosen]
            cur[live] += 1
            done[live] |= np.isin(chosen, stop_array) | (cur[live] >= limits[live])
            if prompt_step:
                self.last_timings["prompt_seconds"] = time.perf_counter() - started
                started = time.perf_counter()
                prompt_step = False
            else:
                self.last_timings["generate_seconds"] = time.perf_counter() - started
            self.last_timings["generated_tokens"] += 1
            out = np.full(n, -1, dtype=np.int64)
            out[live] = chosen
            yield out
            live = np.flatnonzero(~done)
            if live.size == 0:
                break
            ids, slots, positions = tokens[live, cur[live] - 1], live, cur[live] - 1
            wanted = np.ones(len(live), bool)

        out_tokens, out_logprobs = [], []
        for b, p in enumerate(prompts):
            start = 0 if echo else len(p)
            toks = tokens[b, start:cur[b]].tolist()
            probs = token_logprobs[b, start:start + len(toks)].tolist()
            gen_from = len(p) - start
            for i in range(gen_from, len(toks)):
                if toks[i] in stops:
                    toks, probs = toks[:i], probs[:i]
                    break
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)
