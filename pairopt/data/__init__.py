"""The data layer: preference datasets in, tokenised groups (a prompt, its responses, the
pairs among them) out.

Files: `config.py` (the `data` config section; light), `formats.py` (standard,
conversational, implicit prompt, ranked: detected from the columns), `rows.py` (one row ->
checked, tokenised, truncated ids), `ranked_rows.py` (the same for a prompt with k scored
responses), `report.py` (what happened to the rows), `load.py` (`load_preference_data`: read,
check, tokenise, split; `rows_to_pairs` for the engine), `groups.py` (`make_groups`: pairwise
rows grouped by prompt, pairs picked from scores), `batch.py` (`rows_to_batch`: groups with
their pairs as flat response indices). `load.py`, `rows.py`, `ranked_rows.py` and `groups.py`
import `datasets`.
"""
