"""CPU engine steps pick their intra-op thread count: steps of several decoding sequences leave
`cpu_reserved_cores` to the API server; prefill-sized steps and lone sequences use every thread."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine
from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import CPU_BIG_STEP_TOKENS, cpu_thread_policy
from nsa_serve.engine.protocol import SamplingParams


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_policy_reserves_cores_but_keeps_one_thread():
    assert cpu_thread_policy(EngineArgs(cpu_threads=4, cpu_reserved_cores=1)) == (3, 4)
    assert cpu_thread_policy(EngineArgs(cpu_threads=2, cpu_reserved_cores=5)) == (1, 2)
    torch.set_num_threads(3)
    assert cpu_thread_policy(EngineArgs()) == (3, 3)  # default: torch's count, nothing reserved
    for bad in (dict(cpu_threads=0), dict(cpu_reserved_cores=-1)):
        with pytest.raises(ValueError, match="cpu_"):
            EngineArgs(**bad).validate()


def test_steps_switch_between_reserved_and_all_threads():
    n = CPU_BIG_STEP_TOKENS
    engine = make_engine(cpu_threads=2, cpu_reserved_cores=1, max_num_batched_tokens=4 * n,
                         long_prefill_token_threshold=2 * n)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for rid in ("a", "b"):
        engine.add_request(rid, list(range(10, 10 + n)), params)
    engine.step()  # both prompts in one step: 2n tokens, a prefill-sized step
    assert torch.get_num_threads() == 2
    engine.step()  # two sequences decoding: one core left to the server
    assert torch.get_num_threads() == 1
    engine.abort_request("b")
    engine.step()  # the abort is applied, then a lone sequence decodes: every thread
    assert torch.get_num_threads() == 2
    engine.abort_request("a")
    engine.step()
    assert not engine.has_unfinished_requests()
