"""scripts/cluster_floor.cu: the CUDA C++ probe behind docs/benchmarks/decode.md's thirty-third
round must keep building for sm_90a, and its per-CTA read must keep a whole 40 KB tile in flight
(cp.async copies, not plain loads that ptxas would consume a few at a time) — the round's
comparison of links rests on it. Needs CUDA's nvcc (on this project's machines; skipped where it
is missing); nothing runs on a GPU here."""

import re
import shutil
import subprocess

import pytest

from script_helpers import SCRIPTS

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="CUDA's nvcc is not installed")


def test_probe_builds_for_sm90a_with_its_tile_in_flight(tmp_path):
    ptx = tmp_path / "cluster_floor.ptx"
    build = subprocess.run([NVCC, "-O3", "-std=c++17", "-arch=compute_90a", "--ptx",
                            str(SCRIPTS / "cluster_floor.cu"), "-o", str(ptx)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    text = ptx.read_text()
    entries = re.split(r"\.visible \.entry ", text)[1:]
    bodies = {e.split("(", 1)[0]: e for e in entries}
    names = list(bodies)
    link = next(n for n in names if "chain_link" in n)
    cluster = next(n for n in names if "cluster_chain" in n)
    for name in (link, cluster):
        body = bodies[name]
        # Two halves of five 16-byte copies a thread issued before the first wait: 40 KB a CTA.
        first_wait = body.index("cp.async.wait_group")
        assert body[:first_wait].count("cp.async.cg.shared.global") == 10, name
        assert "ld.global.v4" not in body, name  # no plain vector loads of the tile
    assert "barrier.cluster.arrive" in bodies[cluster] and "barrier.cluster.wait" in bodies[cluster]
    assert "mapa" in bodies[cluster]  # the neighbour's shared memory, addressed across the cluster
    assert "griddepcontrol.wait" in bodies[link]
    # The step of operations (fifty-sixth session): its 'X' gathers from the other CTAs' shared
    # memory (mapa, then loads through the generic address it gives) between cluster barriers, and
    # its 'P' / 'T' keep the tile in flight as above.
    step = bodies[next(n for n in names if "cluster_step" in n)]
    assert step.count("mapa") >= 2 and step.count("barrier.cluster.wait") >= 2
    first_wait = step.index("cp.async.wait_group")
    assert step[:first_wait].count("cp.async.cg.shared.global") == 10
    assert "ld.global.v4" not in step
