"""A pipeline stage's part of a model: a contiguous range of decoder layers, plus the embedding on
the first stage and the final norm and output head on the last.

A stage's engine holds only its own tensors, its layers renumbered from 0 (layer `first + i` of
the model is the stage's layer `i`), and KV slots for those layers only. A tied output head is
the embedding matrix, so the last stage holds the embedding too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelArgs

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Stage:
    """Decoder layers `first..stop-1`; `embeds`: the stage takes token ids (else hidden states
    `[rows, hidden_size]`); `heads`: it returns logits (else the hidden states of every row)."""

    first: int
    stop: int
    embeds: bool
    heads: bool

    @classmethod
    def whole(cls, args: ModelArgs) -> Stage:
        return cls(0, args.num_hidden_layers, True, True)

    @classmethod
    def split(cls, args: ModelArgs, layer_counts: list[int]) -> list[Stage]:
        """Consecutive stages with these many layers each."""
        if sum(layer_counts) != args.num_hidden_layers or any(n <= 0 for n in layer_counts):
            raise ValueError(f"a split of {args.num_hidden_layers} layers needs positive counts that add up to it, "
                             f"got {layer_counts}")
        stages, first = [], 0
        for i, n in enumerate(layer_counts):
            stages.append(cls(first, first + n, i == 0, i == len(layer_counts) - 1))
            first += n
        return stages

    def __post_init__(self) -> None:
        if not 0 <= self.first < self.stop:
            raise ValueError(f"a stage needs at least one layer, got layers {self.first}..{self.stop - 1}")

    @property
    def num_layers(self) -> int:
        return self.stop - self.first

    @property
    def is_whole(self) -> bool:
        return self.embeds and self.heads and self.first == 0

    def local_name(self, name: str, args: ModelArgs) -> str | None:
        """The model tensor `name` under this stage's numbering, or None where the stage does not hold it."""
        m = _LAYER.match(name)
        if m:
            layer = int(m.group(1))
            return f"model.layers.{layer - self.first}.{m.group(2)}" if self.first <= layer < self.stop else None
        if name == "model.embed_tokens.weight":
            return name if self.embeds or (self.heads and args.tie_word_embeddings) else None
        if name in ("model.norm.weight", "lm_head.weight"):
            return name if self.heads else None
        return None

    def tensor_names(self, args: ModelArgs) -> dict[str, str]:
        """Stage name -> model name of every tensor the stage holds, in the model's order."""
        names = {}
        for name in args.expected_shapes():
            local = self.local_name(name, args)
            if local is not None:
                names[local] = name
        return names

    def expected_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        shapes = args.expected_shapes()
        return {local: shapes[name] for local, name in self.tensor_names(args).items()}

    def layer_windows(self, args: ModelArgs) -> list[int]:
        return args.layer_windows()[self.first:self.stop]

    def engine_config(self, args: ModelArgs) -> dict:
        """What the Rust engine's constructor takes for this stage."""
        config = args.engine_config()
        config.update(num_hidden_layers=self.num_layers, layer_windows=self.layer_windows(args),
                      tensors=[(n, list(s)) for n, s in self.expected_shapes(args).items()],
                      layer_offset=self.first, embeds_tokens=self.embeds, computes_logits=self.heads)
        return config
