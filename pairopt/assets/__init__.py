"""Assets shipped with pairopt: a tiny model config + tokenizer, and a tiny preference dataset.

Refer to them as `builtin:<name>` (`pairopt.sources.resolve_builtin`); regenerate them with
`python -m pairopt.assets.build`. README.md in this folder describes the task and the sizes.
"""
