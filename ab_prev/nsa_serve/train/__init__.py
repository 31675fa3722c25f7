"""Training the default NSA model: data preparation, the training loop, and evaluation.

docs/training.md is the guide. Module map:
  extract.py  text from Debian documentation files (rst/txt/html/pod)
  prepare.py  download → unpack → extract → dedupe → split → tokenizer → token files
  tokens.py   the uint16 token file format
  tasks.py    synthetic long-context retrieval tasks (passkey, key–value lookup) in the chat template
  batches.py  what one training step sees: LM windows and tasks, by curriculum phase
  forward.py  the reference model's forward with query-chunked, recomputed attention (same math)
  state.py    checkpoints: the model directory, exact resume state, compact resume state
  trainer.py  the loop (AdamW, cosine schedule, bf16 autocast, time budget)
  evaluate.py held-out perplexity and passkey accuracy through the HTTP server
"""
