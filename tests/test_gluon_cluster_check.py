"""scripts/gluon_cluster_check.py: behind docs/benchmarks/decode.md's thirty-fourth round's claim
that Triton 3.9's Gluon can hand a decode step's scores and partial outputs between a cluster's
CTAs through distributed shared memory. Compile-only (sm_90, no GPU); needs Triton >= 3.9, whose
layouts spread a tensor over a cluster (the GPU image's 3.6 has none: skipped there)."""

import subprocess
import sys

import pytest
import triton

from script_helpers import SCRIPTS

VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(VERSION < (3, 9), reason="Gluon's cga_layout needs Triton >= 3.9")


def test_cluster_sum_and_gather_lower_to_distributed_shared_memory():
    r = subprocess.run([sys.executable, str(SCRIPTS / "gluon_cluster_check.py")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| cluster_")}
    assert set(rows) == {"cluster_sum", "cluster_gather"}, r.stdout
    for name, (builds, mapa, remote_loads, barriers) in rows.items():
        # Another CTA's shared memory addressed and read, between cluster barriers.
        assert builds == "yes" and int(mapa) >= 1 and int(remote_loads) >= 1 and int(barriers) >= 2, (name, r.stdout)
