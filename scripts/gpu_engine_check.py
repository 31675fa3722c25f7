"""GPU check of the engine end to end: the real engine on CUDA (Triton prefill/decode kernels, the
Triton cache writer, CUDA-graph decode) must produce the same greedy tokens as the reference model's
incremental API, for shared and independent K/V, in fp32. Run on a GPU machine:
    python3 scripts/gpu_engine_check.py
"""

import random
import sys

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.model.config import preset
from nsa_serve.model.nsa_model import NSAModel


def reference_greedy(model, prompt, n):
    cache = model.new_cache()
    logits = model.step(torch.tensor(prompt, device="cuda"), cache)[-1]
    out = []
    for _ in range(n):
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits = model.step(torch.tensor([tok], device="cuda"), cache)[-1]
    return out


def main() -> int:
    failures = 0
    for shared in (True, False):
        # Paper sparsity ratios scaled to the tiny widths; prompts cross many pages and summaries.
        cfg = preset("tiny", shared_kv=shared, cmp_block=32, cmp_stride=16, select_block=64, num_select=16,
                     window=512 if shared else 128)
        model = NSAModel(cfg).init_weights(seed=1).to("cuda").eval()
        engine = LLMEngine(EngineArgs(device="cuda", dtype="float32", num_pages=2048, max_num_seqs=8,
                                      max_num_batched_tokens=1024, long_prefill_token_threshold=384),
                           model=model, tokenizer=None, model_name="gpu-check")
        engine.warmup()
        rng = random.Random(0)
        prompts = [[rng.randrange(8, cfg.vocab_size) for _ in range(rng.randrange(100, 2500))] for _ in range(6)]
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            ref = reference_greedy(model, prompt, 12)
            got = out.outputs[0].token_ids
            ok = got == ref
            failures += not ok
            print(f"shared_kv={shared} prompt {i} ({len(prompt)} tokens): {'OK' if ok else 'MISMATCH'}"
                  + ("" if ok else f"\n  engine {got}\n  ref    {ref}"))
        # Prompt logprobs (prefill rows scored in slices) against the reference's full forward.
        outs = engine.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            with torch.no_grad():
                ref = torch.log_softmax(model.step(torch.tensor(prompt, device="cuda"), model.new_cache())[:-1].double(), -1)
            want = ref.gather(1, torch.tensor(prompt[1:], device="cuda").unsqueeze(1)).squeeze(1).cpu()
            got = torch.tensor([t.logprob for t in out.prompt_logprobs[1:]], dtype=torch.float64)
            err = float((got - want).abs().max())
            ok = out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt) and err < 2e-3
            failures += not ok
            print(f"shared_kv={shared} prompt {i} prompt_logprobs: max |err| {err:.2e} {'OK' if ok else 'MISMATCH'}")
        print("attention:", engine.runner.attention.describe())
        engine.block_manager.check_all_free()
    print("GPU engine check:", "PASS" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
