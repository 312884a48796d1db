"""The data layer: preference datasets in, tokenised pairs out.

Files: `config.py` (the `data` config section; light), `formats.py` (standard,
conversational, implicit prompt: detected from the columns), `rows.py` (one row -> checked,
tokenised, truncated ids), `report.py` (what happened to the rows), `load.py`
(`load_preference_data`: read, check, tokenise, split; `rows_to_pairs` for the engine).
Only `load.py` and `rows.py` import `datasets`.
"""
