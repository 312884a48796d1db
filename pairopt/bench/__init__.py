"""`pairopt bench`: the prefix-shared forward measured against the classic one, side by side.

Files, bottom up: `model.py` (the Llama measured), `checks.py` (option checks), `data.py`
(length profiles, real-data lengths, batches, the ideal speed-up), `measure.py` (peak memory,
time breakdown, the LM-head sweep), `run.py` (modes, rounds, results), `report.py` (table,
chart, environment), `peer.py` (TRL's DPOTrainer vs pairopt), `packing.py` (packing efficiency
of the token-budget sampler), `cli.py` (`pairopt bench`). Light: torch and transformers only
(TRL for the peer, matplotlib for the chart, both optional).
"""
