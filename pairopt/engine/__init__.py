"""The prefix-shared forward: pairs -> packed rows -> masked forward -> per-response log-probs.

Files, in the order the data flows: `layout.py` (pairs -> rows), `masks.py` (the mask rule and
its encodings), `attention.py` (backends: how a mask reaches the model), `logps.py` (chunked
log-probs at scoring positions), `compat.py` (which models can be masked; dropout),
`forward.py` (`compute_logps`, which ties them together). Nothing here imports pydantic or
datasets, so the engine runs on a bare torch + transformers machine.

Shape legend used in these files: B rows, L row length, D hidden size, V vocabulary, H heads,
T scored tokens, G groups (prompts), k responses per group, R = G * k responses.
"""
