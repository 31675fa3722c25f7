"""When each request is sent: offsets (seconds from the start of the measured phase).

- fixed:   one request every 1/rate seconds.
- poisson: exponential gaps with mean 1/rate (a gamma process with shape 1).
- gamma:   gamma gaps with shape = burstiness and mean 1/rate, as vLLM's --burstiness: < 1 is burstier
           than Poisson, > 1 smoother; the mean rate stays `rate` either way.
- closed:  every request is ready at 0 and --max-concurrency clients each send the next one as soon as
           their previous one ends (closed loop).
The first request goes at 0. A --max-concurrency cap may also bound the open-loop kinds; then a
request waits for a free slot, and its latency is measured from when it is actually sent.
"""

from __future__ import annotations

import math

import numpy as np

ARRIVALS = ("fixed", "poisson", "gamma", "closed")


def arrival_offsets(kind: str, n: int, rate: float | None, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrival process {kind!r}; choose from {', '.join(ARRIVALS)}")
    if n <= 0:
        return []
    if kind == "closed":
        return [0.0] * n
    if rate is None or not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"--arrival {kind} needs a positive finite --request-rate (requests/s), got {rate}")
    if kind == "fixed":
        gaps = np.full(n - 1, 1.0 / rate)
    else:
        shape = 1.0 if kind == "poisson" else burstiness
        if not (math.isfinite(shape) and shape > 0):
            raise ValueError(f"--burstiness must be positive, got {burstiness}")
        rng = np.random.default_rng([seed, 7])
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()
