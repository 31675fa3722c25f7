"""Does a `non_blocking` host→device copy wait for the GPU's queue? (CUDA only.)

Async scheduling queues a decode step's input copies while the previous step still runs. A copy
from pageable host memory may be staged synchronously by the driver; if it waits for the stream,
the "async" launch waits for the previous step. This queues ~N ms of GPU sleep, then one copy of
each size from pageable and from pinned memory, and prints the host time the copy call took
(median of 20). A call that waits for the queue takes about the sleep.

    python scripts/h2d_copy_probe.py [--sleep-ms 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def host_ms(src: torch.Tensor, dst: torch.Tensor, cycles: int) -> float:
    times = []
    for _ in range(20):
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        times.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep-ms", type=float, default=5.0)
    args = ap.parse_args()
    # Calibrate the sleep kernel's cycles to milliseconds.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(10_000_000 * args.sleep_ms / start.elapsed_time(end))
    print(f"GPU sleep queued before each copy: {args.sleep_ms} ms")
    print("| bytes | pageable: host ms | pinned: host ms |")
    print("|---|---|---|")
    for nbytes in (4 << 10, 32 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20):
        n = nbytes // 4
        dst = torch.empty(n, dtype=torch.int32, device="cuda")
        pageable = torch.randint(0, 1 << 20, (n,), dtype=torch.int32)
        pinned = pageable.pin_memory()
        print(f"| {nbytes} | {host_ms(pageable, dst, cycles):.3f} | {host_ms(pinned, dst, cycles):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
