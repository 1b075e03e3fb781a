"""llama.cpp's block formats dequantized with NumPy (the layouts of ggml-common.h): the
definition the Rust kernels are tested against, and how the NumPy backend reads a quantized
GGUF file. Each function takes the raw bytes of whole blocks and returns float32 values."""

from __future__ import annotations

import numpy as np

# type name -> (values per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
PLAIN = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 field at byte `at` of every block, as a float32 column."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles first, then high nibbles, along the last axis."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Bit j of the 4-byte little-endian `qh` for j = 0..31, as a [n, 32] array."""
    bits = np.ascontiguousarray(qh).view("<u4")
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b):
    return _half(b, 0) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8)


def _q4_1(b):
    return _half(b, 0) * _nibbles(b[:, 4:20]) + _half(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << 4)
    return _half(b, 0) * (q.astype(np.float32) - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << 4)
    return _half(b, 0) * q + _half(b, 2)


def _q8_0(b):
    return _half(b, 0) * np.ascontiguousarray(b[:, 2:34]).view(np.int8)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of the 8 sub-blocks of Q4_K / Q5_K, each [n, 8]."""
    sc = np.empty((len(s), 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k4(b, q):
    """Q4_K / Q5_K values from their [n, 8, 32] levels."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    d, dmin = _half(b, 0), _half(b, 2)
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(len(b), 256)


def _q4_k(b):
    qs = b[:, 16:144].reshape(-1, 4, 32)  # each 32 bytes: sub-block 2c in the low nibbles, 2c+1 high
    return _k4(b, np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32))


def _q5_k(b):
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(-1, 4, 32)
    shifts = 2 * np.arange(4, dtype=np.uint8)[None, :, None]
    lo = (qs & 0x0F) | (((qh[:, None, :] >> shifts) & 1) << 4)
    hi = (qs >> 4) | (((qh[:, None, :] >> (shifts + 1)) & 1) << 4)
    return _k4(b, np.stack([lo, hi], axis=2).reshape(-1, 8, 32))


def _q6_k(b):
    ql, qh = b[:, 0:128], b[:, 128:192]
    halves = []
    for n in range(2):
        low, h = ql[:, 64 * n:64 * n + 64], qh[:, 32 * n:32 * n + 32]
        halves += [(low[:, :32] & 0x0F) | ((h & 3) << 4), (low[:, 32:] & 0x0F) | (((h >> 2) & 3) << 4),
                   (low[:, :32] >> 4) | (((h >> 4) & 3) << 4), (low[:, 32:] >> 4) | (((h >> 6) & 3) << 4)]
    q = np.concatenate(halves, axis=1).astype(np.float32) - 32
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return (_half(b, 208) * np.repeat(scales, 16, axis=1)) * q


_DEQUANTIZE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
               "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of `shape` from the bytes `raw` of a tensor stored as `type_name`."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if type_name in PLAIN:
        values = raw.view(PLAIN[type_name])
        if type_name == "BF16":
            return (values.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return values.astype(np.float32).reshape(shape)
    if type_name not in _DEQUANTIZE:
        from ..errors import ModelFormatError
        raise ModelFormatError(f"tensor type {type_name} is not supported (ellm reads F32, F16, BF16, "
                               f"{', '.join(_DEQUANTIZE)})")
    _, size = BLOCKS[type_name]
    return _DEQUANTIZE[type_name](raw.reshape(-1, size)).astype(np.float32).reshape(shape)
