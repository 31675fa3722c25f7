"""scripts/decode_sass_counts.py: the SASS opcode counts that found Triton 3.9's fused-merge
regression (docs/benchmarks/decode.md, thirty-sixth round) must read every instruction of a listing
— a first count's pattern stopped at four-digit addresses, 4 096 instructions — and compile the
launch a GPU makes (the fused merge's arrival counter is an atomic only that launch has)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*fff0*/              @!P0 BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*10000*/                  SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*10010*/              @P1 SHFL.BFLY PT, R5, R4, 0x2, 0x1f ;
        /*10020*/             @UP0 LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64] ;
        /*10030*/              @PT ATOMG.E.ADD.STRONG.GPU PT, R9, desc[UR4][R10.64], R11 ;
        /*10040*/                  EXIT ;
"""


def test_opcode_counts_read_every_instruction_by_opcode():
    m = load_script("decode_sass_counts")
    ops = m.opcode_counts(SASS)
    assert sum(ops.values()) == 8  # five-digit addresses included
    assert (ops["BAR"], ops["SHFL"], ops["LDGSTS"], ops["ATOMG"], ops["LDC"], ops["EXIT"]) == (1, 2, 1, 1, 1, 1)


def _rows(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "decode_sass_counts.py"), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("|")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["kernel"]: row for row in rows}


@pytest.mark.slow
def test_the_gpu_batch16_launch_compiles_with_and_without_the_fused_merge():
    fused_step = _rows("--batch", "16", "--fuse", "1", "--merge-chunk", "1")
    apart_step = _rows("--batch", "16", "--fuse", "0")
    assert list(fused_step) == ["_cmp_tile_kernel", "_score_kernel", "_attend_kernel"]
    assert list(apart_step) == ["_cmp_tile_kernel", "_score_kernel", "_attend_kernel", "_combine_kernel"]
    fused, apart = fused_step["_attend_kernel"], apart_step["_attend_kernel"]
    assert fused["ATOMG"] == "1" and apart["ATOMG"] == "0"  # the last-arriving split's counter
    assert int(fused["instructions"]) > int(apart["instructions"]) > 1000
    assert int(fused["HMMA"]) == int(apart["HMMA"]) > 0  # the same attention loops either way
