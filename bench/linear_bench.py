"""Microbenchmark: ``F.linear`` against MKL's packed-weight GEMM (``torch.ops.mkl._mkl_linear``) for SmolLM2-135M's
projection shapes, packed for 64 and for 1,344 rows, at 1 to 1,344 rows. Prints GFLOP/s (``2 * M * N * K`` / best
of ``--repeat`` seconds). Run: ``python -m bench.linear_bench``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = ((960, 576), (3072, 576), (576, 1536), (49152, 576))  # fused QKV, fused gate/up, down, LM head


def best_seconds(fn, repeat: int) -> float:
    """Fastest of ``repeat`` timed calls after three warm-up calls, seconds."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.backends.mkl.is_available():
        print("this torch build has no MKL: nothing to compare")
        return 1
    reorder, packed = torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s")
    print(f"{'N x K':>12} {'rows':>6} {'F.linear':>9} {'packed@64':>10} {'packed@1344':>12}")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        p64, p1344 = reorder(w, 64), reorder(w, 1344)
        for m in (1, 16, 64, 1344):
            x = torch.randn(m, k)
            flop = 2 * m * n * k
            calls = (
                lambda x=x, w=w: F.linear(x, w),
                lambda x=x, w=w, p=p64, m=m: packed(x, p, w, None, m),
                lambda x=x, w=w, p=p1344, m=m: packed(x, p, w, None, m),
            )
            r = [flop / best_seconds(f, args.repeat) / 1e9 for f in calls]
            print(f"{n:>6} x {k:<5} {m:>6} {r[0]:>9.1f} {r[1]:>10.1f} {r[2]:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
