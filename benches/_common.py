"""Side-by-side timing helpers: every ratio in a table is measured in the same run."""

import os
import time

os.environ.setdefault("RAYON_NUM_THREADS", "2")


def best_of(fn, repeat=7, min_time=0.05):
    """Best per-call seconds over `repeat` rounds of enough calls to last `min_time`."""
    fn()
    calls = 1
    while True:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t >= min_time:
            break
        calls *= 2
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))
