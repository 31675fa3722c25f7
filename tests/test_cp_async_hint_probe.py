"""scripts/cp_async_hint_probe.py: its PTX rewrite must give every cp.async copy of the named
kernels an evict-first L2 policy that is made before any copy runs, and leave other kernels alone
— the device measurements in docs/benchmarks/decode.md (twenty-first round) rest on it."""

import os
import subprocess
import sys
import textwrap

import pytest

from script_helpers import SCRIPTS, load_script

PROBE = SCRIPTS / "cp_async_hint_probe.py"


def _probe():
    return load_script("cp_async_hint_probe")


# The shape of Triton 3.6's PTX for a pipelined kernel (declarations, then copies in the loop).
PTX = textwrap.dedent("""\
    .visible .entry k(
    \t.param .u64 .ptr .global .align 1 k_param_0
    )
    {
    \t.reg .pred \t%p<4>;
    \t.reg .b32 \t%r<20>;
    \t.reg .b64 \t%rd<12>;
    // %bb.0:
    \tld.param.b64 \t%rd1, [k_param_0];
    \tcp.async.cg.shared.global [ %r3 + 0 ], [ %rd4 + 0 ], 0x10, %r5;
    \tcp.async.commit_group;
    $L__BB0_1:
    \tcp.async.cg.shared.global [ %r6 + 2048 ], [ %rd7 + 0 ], 0x10, %r8;
    \tcp.async.wait_group \t1;
    \tld.global.v4.b32 { %r9, %r10, %r11, %r12 }, [ %rd9 + 0 ];
    }
    """)


@pytest.mark.parametrize("at_copy", [False, True])
def test_every_copy_gets_the_policy_made_before_it(at_copy, monkeypatch):
    if at_copy:
        monkeypatch.setenv("HINT_AT_COPY", "1")
    else:
        monkeypatch.delenv("HINT_AT_COPY", raising=False)
    out, n = _probe().add_evict_first(PTX)
    assert n == 2
    lines = [line.strip() for line in out.splitlines()]
    copies = [i for i, line in enumerate(lines) if line.startswith("cp.async.cg.shared.global")]
    assert len(copies) == 2
    for i in copies:
        assert lines[i].startswith("cp.async.cg.shared.global.L2::cache_hint [")
        assert lines[i].endswith(", 0x10, %r5, %rd_evf;") or lines[i].endswith(", 0x10, %r8, %rd_evf;")
    made = [i for i, line in enumerate(lines)
            if line == "createpolicy.fractional.L2::evict_first.b64 %rd_evf, 1.0;"]
    declared = [i for i, line in enumerate(lines) if line == ".reg .b64 %rd_evf;"]
    assert len(declared) == 1 and declared[0] < min(made)
    if at_copy:
        assert [i + 1 for i in made] == copies  # made right before each copy
    else:
        assert len(made) == 1 and made[0] < lines.index("// %bb.0:")  # once, at the entry
    # Everything else is unchanged.
    assert [line for line in out.splitlines() if "evf" not in line and "cp.async.cg.shared" not in line] == \
        [line for line in PTX.splitlines() if "cp.async.cg.shared" not in line]


def test_ptx_without_copies_is_unchanged():
    ptx = PTX.replace("cp.async.cg.shared.global", "st.shared.b32")
    assert _probe().add_evict_first(ptx) == (ptx, 0)


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, triton, triton.language as tl
import cp_async_hint_probe as probe
from nsa_kernels.compile_check import compile_only

@triton.jit
def streamed(src, dst, n):
    acc = tl.zeros([64, 64], tl.float32)
    r = tl.arange(0, 64)
    for t in tl.range(0, n, num_stages=3):
        a = tl.load(src + t * 4096 + r[:, None] * 64 + r[None, :])
        acc += tl.dot(a, a)
    tl.store(dst + r[:, None] * 64 + r[None, :], acc)

log = []
x, y = torch.empty(1 << 16, dtype=torch.float16), torch.empty(4096)
sink = []
probe.install(("streamed",), log)
with compile_only(90, sink):
    streamed[(1,)](x, y, 8)
probe.install(("another",), log)  # the same kernel, not named: a fresh compile (8 warps) stays as built
with compile_only(90, sink):
    streamed[(1,)](x, y, 8, num_warps=8)
(_, hinted), (_, plain) = sink
n = hinted.asm["ptx"].count("cp.async.cg.shared.global")
assert n > 0 and hinted.asm["ptx"].count("cp.async.cg.shared.global.L2::cache_hint") == n, n
assert hinted.asm["ptx"].count("createpolicy.fractional.L2::evict_first.b64 %rd_evf") == 1
assert len(hinted.asm["cubin"]) > 0  # ptxas took it
assert "%rd_evf" not in plain.asm["ptx"] and plain.asm["ptx"].count("cp.async.cg.shared.global") > 0
assert log == [("streamed", n)], log
print("ok", n)
"""


@pytest.mark.slow
def test_the_hook_rewrites_the_named_kernel_only_and_ptxas_takes_it(tmp_path):
    # A real sm_90 compile (no GPU: compile_check's compile-only driver) in a child process without
    # TRITON_INTERPRET (Triton reads kernel source from a file). Neither kernel asks for a policy,
    # so their copies come out unhinted from any Triton, and the hook's are the only hints.
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HINT_AT_COPY")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # the hook is not part of Triton's cache key
    r = subprocess.run([sys.executable, str(child), str(PROBE.parent)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
