"""scripts/topn_latency_probe.py: the loop it times must find the same top-n as the decode
reference's rule (forced first and last blocks, then the best scores), or the latency it prints
(docs/benchmarks/decode.md, thirty-fifth round) would not be a top-n's. CPU interpreter, small
block counts, random scores."""

import pytest
import torch

from kernels_interpret import DEVICE, load_kernels
from nsa_kernels.reference import SparsityParams, select_blocks
from script_helpers import load_script

load_kernels()


@pytest.mark.parametrize("mode", ["passes", "sort"])
@pytest.mark.parametrize("blocks,cur", [(64, 63), (256, 200)])
def test_loop_finds_the_reference_top_n(mode, blocks, cur):
    m = load_script("topn_latency_probe")
    g = torch.Generator().manual_seed(blocks + cur)
    score = torch.rand(blocks, generator=g)
    got = m.run(score.to(DEVICE), cur, 3, mode, 16, 4).cpu().tolist()
    want = m.reference(score, cur, 16)
    assert got == want
    # The probe's ordered rule chooses what the model's reference chooses (paper shape's forced
    # blocks: the first and the two most recent), so its latency is the decode top-n's.
    p = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)
    chosen = select_blocks(score.view(1, 1, -1), torch.tensor([cur * p.select_block]), p)[0, 0]
    assert sorted(want) == chosen.nonzero().flatten().tolist()
