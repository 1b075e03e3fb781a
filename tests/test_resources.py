"""Memory over time: no growth across many forward calls and generations, and a dropped model
gives its memory back (bounded loops, RSS read from /proc)."""

import gc
import os

import pytest

from conftest import BACKENDS, DATA, load_on

TINY = os.path.join(DATA, "archs", "llama")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_free_heap() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_growth_over_thousands_of_forwards_and_hundreds_of_generations(backend):
    m = load_on(backend, TINY)
    ids = [[5, 17, 33, 2, 90, 14, 71, 8]]
    for _ in range(300):  # warm up: allocator pools, caches
        m.forward(ids)
    before = rss_mb()
    for i in range(3000):
        m.forward(ids, 0)
        m.forward([[i % 300]], len(ids[0]))
    for i in range(200):
        m.generate([ids[0][: 2 + i % 6]], 12, temperature=0.8, seed=i)
    growth = rss_mb() - before
    assert growth < 8, f"RSS grew by {growth:.1f} MB"


def test_a_dropped_model_returns_its_memory():
    from ellm._bundled import bundled_model_path

    gc.collect()
    release_free_heap()  # else the model may reuse memory earlier tests freed, and RSS not grow
    before = rss_mb()
    m = load_on("rust" if "rust" in BACKENDS else "numpy", bundled_model_path(), dtype="f32")
    m.forward([[1, 2, 3]])
    loaded = rss_mb()
    assert loaded - before > 400  # 538 MB of f32 weights
    del m
    gc.collect()
    release_free_heap()
    assert rss_mb() - before < 100, f"{rss_mb() - before:.0f} MB still held after the model was dropped"
