"""Training: configs in, a fine-tuned transformers model directory out.

Files: `config.py` (the sections of `TrainConfig`), `config_load.py` (dicts, YAML and the
tiny-model preset -> a validated config), `flags.py` (`pairopt train` flags and --help),
`models.py` (loading a causal LM; light), `policy.py` (the policy: tokenizer, dropout, LoRA,
the module accelerate wraps), `reference.py` and `reference_cache.py` (the reference
strategies, precomputed log-probs on disk), `schedule.py` (data order, optimiser, learning
rate), `loss_inputs.py` (what a loss of each kind receives from a batch of groups),
`evaluation.py`, `run_log.py` (metrics, console, trackers), `checkpoint.py` (checkpoints,
final save), `run_directory.py` (the locked output directory), `preemption.py` (signals ->
a clean stop), `files.py` (atomic, checksummed writes), `setup.py` (`setup`: everything
before step 1), `steps.py` (`train_step`, `run_steps`) and `trainer.py` (`train`).
"""
