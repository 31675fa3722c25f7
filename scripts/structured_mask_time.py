"""Cost of structured outputs on this machine: llguidance tokenizer build, grammar compile, and the
per-step token mask, for three grammars with the bundled model's tokenizer; then one step's masks
for a batch of rows, one by one (the sampler before) and in one call on llguidance's thread pool
(the sampler now) (docs/engine.md).

    python scripts/structured_mask_time.py
"""
import time, statistics, torch
from nsa_serve.tokenizer import Tokenizer
from nsa_serve.engine.structured import GrammarCompiler, StructuredOutput, allowed_mask, allowed_masks
from nsa_serve.model.checkpoint import default_model_dir
tok = Tokenizer(default_model_dir() / "tokenizer.model")
t0 = time.perf_counter(); gc = GrammarCompiler(tok, tok.vocab_size); gc._llg_tokenizer(); t1 = time.perf_counter()
print(f"llguidance tokenizer build: {1e3*(t1-t0):.1f} ms")
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "tags"]}
for so in (StructuredOutput("json", schema), StructuredOutput("regex", "[a-z]+( [a-z]+)*\\."), StructuredOutput("json_object", None)):
    t0 = time.perf_counter(); m = gc.matcher(so); t1 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(60):
        s = time.perf_counter(); a = allowed_mask(m, tok.vocab_size); times.append(time.perf_counter() - s)
        ids = a.nonzero().flatten()
        t = int(ids[torch.randint(len(ids), (1,), generator=g)])
        m.consume_token(t)
        if m.is_stopped(): break
    print(f"{so.kind:12s} compile {1e3*(t1-t0):.2f} ms; mask median {1e6*statistics.median(times):.0f} us, max {1e6*max(times):.0f} us over {len(times)} steps")

# One step of a batch: rows of the JSON schema at different depths.
for rows in (16, 64):
    g = torch.Generator().manual_seed(1)
    ms = []
    for r in range(rows):
        m = gc.matcher(StructuredOutput("json", schema))
        for _ in range(r % 12):
            ids = allowed_mask(m, tok.vocab_size).nonzero().flatten()
            m.consume_token(int(ids[torch.randint(len(ids), (1,), generator=g)]))
        ms.append(m)
    one, batch = [], []
    for _ in range(30):
        s = time.perf_counter(); [allowed_mask(m, tok.vocab_size) for m in ms]; one.append(time.perf_counter() - s)
        s = time.perf_counter(); allowed_masks(ms, tok.vocab_size); batch.append(time.perf_counter() - s)
    print(f"{rows} rows, one step: one by one {1e3*statistics.median(one):.2f} ms, batched "
          f"{1e3*statistics.median(batch):.2f} ms (median of 30)")
