"""The selection mapping (overlap-weighted Eq. 9) and block choice, against hand-computed values."""

import torch

from nsa_kernels.reference import SparsityParams, select_blocks, selection_weights


def test_paper_mapping_weights_are_1_2_2_2_1():
    # l=32, d=16, l'=64: entry i covers tokens [16i, 16i+32); block j covers [64j, 64j+64).
    W = selection_weights(n_cmp=12, n_sel=3, block=32, stride=16, select_block=64)
    # Block 1 (tokens 64..127): entry 3 = [48, 80) shares 16 tokens → 1; entries 4, 5, 6 lie inside → 2;
    # entry 7 = [112, 144) shares 16 → 1. Nothing else touches it.
    expected_block1 = torch.zeros(12)
    expected_block1[3:8] = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0])
    assert torch.equal(W[:, 1], expected_block1)
    # Block 0 has no entry −1: entries 0, 1, 2 get 2 and entry 3 gets 1.
    assert W[:4, 0].tolist() == [2.0, 2.0, 2.0, 1.0] and W[4:, 0].abs().sum() == 0
    # Every entry inside the 3 blocks (tokens < 192) has weights adding up to l/d = 2; entry 11,
    # [176, 208), sticks out of the last block and keeps only its first half.
    assert torch.equal(W[:11].sum(1), torch.full((11,), 2.0)) and W[11].sum() == 1.0


def test_identity_when_block_stride_and_selection_are_equal():
    W = selection_weights(n_cmp=5, n_sel=5, block=16, stride=16, select_block=16)
    assert torch.equal(W, torch.eye(5))


def test_scaled_mapping():
    # l=8, d=4, l'=16: entry i covers [4i, 4i+8); block j covers [16j, 16j+16).
    W = selection_weights(n_cmp=8, n_sel=2, block=8, stride=4, select_block=16)
    assert W[:, 0].tolist() == [2, 2, 2, 1, 0, 0, 0, 0]
    assert W[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1]


P = SparsityParams(block=8, stride=4, select_block=16, num_select=4, window=32)


def chosen(scores, t):
    mask = select_blocks(torch.tensor(scores, dtype=torch.float64).view(1, 1, -1), torch.tensor([t]), P)
    return torch.nonzero(mask[0, 0]).flatten().tolist()


def test_forced_blocks_always_selected_even_with_lowest_scores():
    # Query at t=100 sits in block 6; blocks 0 (initial), 5 and 6 (local) are forced though they score 0.
    scores = [0.0, 0.9, 0.1, 0.8, 0.7, 0.0, 0.0]
    assert chosen(scores, 100) == [0, 1, 5, 6]  # one free place: the best of the rest, block 1


def test_ties_go_to_the_lower_block_index():
    scores = [0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert chosen(scores, 100) == [0, 1, 5, 6]


def test_all_blocks_when_n_covers_them():
    assert chosen([0.1, 0.2, 0.3], 40) == [0, 1, 2]  # 3 visible blocks ≤ n = 4
    assert chosen([0.3], 3) == [0]


def test_blocks_after_the_query_are_never_selected():
    # t=20 is in block 1; blocks 2.. lie in the future even with large scores.
    assert chosen([0.1, 0.1, 5.0, 5.0], 20) == [0, 1]
