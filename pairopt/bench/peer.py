"""The peer: TRL's DPOTrainer and pairopt, same tiny model, data, batch and steps; pairs/s of both.

    python -m pairopt.bench.peer --profile hh_rlhf --pairs-per-step 4 --steps 8
    python -m pairopt.bench.peer --group-profile ultrafeedback_onpolicy --group-pairs all
    pairopt bench --peer ...                      (the same)

With a group profile (k responses per prompt, pairopt/bench/groups.py) both train on the same
pairs: TRL on the pairs written out one per row, `--groups-per-step` prompts' pairs per step;
pairopt on the groups (every response computed once, `compute_group_logps`) and, for
reference, on the same pairs prefix-shared one per segment (`compute_logps`).

TRL is an optional bench dependency (`pip install pairopt[bench]`), never a runtime one.

What is compared, per training step, for both: a reference forward without gradient, the policy
forward and backward, DPO's sigmoid loss (beta 0.1) and an AdamW step, on the same N pairs in the
same order (TRL's random sampler is replaced by a sequential one). TRL tokenises text, so the
pairs are written as words of a word-level tokenizer built in memory, one word per token id;
its token counts are the ones pairopt gets (prompt, response + EOS). TRL pads [prompt ; chosen]
and [prompt ; rejected] rows to the longest in the batch and scores them with its fused LM head
(activation checkpointing off, its faster setting; fp32 like pairopt, where TRL would default
to bf16 autocast, slow on CPUs without bf16 units); pairopt runs its defaults (prefix shared, packed, backend auto, chunked head). Step times come
from a TrainerCallback (TRL) and the same clock around pairopt's step; the first `--warmup`
steps of each are dropped.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.bench.checks import check_numbers, check_shape
from pairopt.bench.data import load_group_profiles, load_profiles
from pairopt.bench.groups import GROUP_PAIRS, group_pairs
from pairopt.bench.model import ModelShape, build_model
from pairopt.engine.forward import compute_group_logps, compute_logps
from pairopt.errors import PairoptError
from pairopt.pairs import PairLogps, PreferencePair, ResponseGroup

EOS, PAD = 1, 0  # word-level vocabulary: 0 <pad>, 1 </s>, then one word per token id


def word_tokenizer(vocab: int) -> Any:
    """A fast tokenizer with words w2 .. w{vocab-1}: 'w5 w9' -> [5, 9]; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "</s>": EOS, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"eos_token": "</s>", "pad_token": "<pad>"})
    return fast


def make_pairs(profile: dict[str, Any], n: int, jitter: float, vocab: int, seed: int) -> list[dict]:
    """Token-id pairs around a profile's lengths; responses end in EOS (TRL appends it too)."""
    rng = random.Random(seed)

    def draw(x: int) -> int:
        return max(1, round(x * rng.uniform(1 - jitter, 1 + jitter)))

    P, C = int(profile["prompt_tokens"]), int(profile["completion_tokens"])

    def ids(k: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(k)]

    return [
        {"prompt": ids(draw(P)), "chosen": ids(draw(C)), "rejected": ids(draw(C))} for _ in range(n)
    ]


def make_group_rows(
    profile: dict[str, Any], n_groups: int, how: str, jitter: float, vocab: int, seed: int
) -> tuple[list[dict], list[tuple[ResponseGroup, list[tuple[int, int]]]]]:
    """Prompts with k responses of distinct random scores: their pairs as rows (TRL and the
    pair-shared run), and each prompt as a group with its pairs (indices into its responses,
    the unpaired responses dropped, as in training). Responses end in EOS in the groups."""
    rng = random.Random(seed)

    def draw(x: int) -> int:
        return max(1, round(x * rng.uniform(1 - jitter, 1 + jitter)))

    P, C, k = (int(profile[key]) for key in ("prompt_tokens", "completion_tokens", "responses"))
    rows, groups = [], []
    for _ in range(n_groups):
        prompt = [rng.randrange(2, vocab) for _ in range(draw(P))]
        responses = [[rng.randrange(2, vocab) for _ in range(draw(C))] for _ in range(k)]
        picked = group_pairs(rng.sample(range(k), k), how)
        used = sorted({i for pair in picked for i in pair})
        for c, r in picked:
            rows.append({"prompt": prompt, "chosen": responses[c], "rejected": responses[r]})
        group = ResponseGroup(prompt, [responses[i] + [EOS] for i in used])
        groups.append((group, [(used.index(c), used.index(r)) for c, r in picked]))
    return rows, groups


def run_pairopt_groups(
    model: nn.Module,
    groups: list[tuple[ResponseGroup, list[tuple[int, int]]]],
    args: argparse.Namespace,
    clock: Any,
) -> list[float]:
    """Step times of pairopt's DPO step on `--groups-per-step` groups at a time: reference and
    policy through `compute_group_logps`, every pair's log-probs indexed out of them."""
    ref = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    times = []
    for i in range(0, len(groups), args.groups_per_step):
        batch = groups[i : i + args.groups_per_step]
        chosen, rejected, first = [], [], 0
        for group, pairs in batch:
            chosen += [first + c for c, _ in pairs]
            rejected += [first + r for _, r in pairs]
            first += len(group.responses)
        index_c, index_r = torch.tensor(chosen), torch.tensor(rejected)
        start = clock()
        with torch.no_grad():
            reference = compute_group_logps(ref, [g for g, _ in batch]).pairs(index_c, index_r)
        policy = compute_group_logps(model, [g for g, _ in batch]).pairs(index_c, index_r)
        _dpo_step(policy, reference, optimizer)
        times.append(clock() - start)
    return times


def _dpo_step(policy: PairLogps, reference: PairLogps, optimizer: Any) -> None:
    margin = (policy.chosen_logps - reference.chosen_logps) - (
        policy.rejected_logps - reference.rejected_logps
    )
    loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def as_text(row: dict[str, list[int]]) -> dict[str, str]:
    # responses start with a space so that prompt + response splits where the prompt ends
    def words(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    return {
        "prompt": words(row["prompt"]),
        "chosen": " " + words(row["chosen"]),
        "rejected": " " + words(row["rejected"]),
    }


def run_trl(model: Any, rows: list[dict], args: argparse.Namespace, clock: Any) -> list[float]:
    """Step times of TRL's DPOTrainer on `rows`, in order."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = clock()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(clock() - self.start)

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, dataset: Any = None) -> Any:
            data: Any = dataset if dataset is not None else self.train_dataset
            return SequentialSampler(data)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.pairs_per_step,
            max_steps=args.steps + args.warmup,
            learning_rate=args.lr,
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=None,
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=args.seed,
            dataloader_num_workers=0,
            # TRL turns activation checkpointing on by default; pairopt does not checkpoint,
            # and TRL is faster without it: compare against its faster setting.
            gradient_checkpointing=False,
            bf16=False,  # TRL's default is bf16 autocast, also on the CPU; both run fp32 here
        )
        trainer = InOrder(
            model=model,
            ref_model=copy.deepcopy(model).eval(),
            args=config,
            train_dataset=Dataset.from_list([as_text(r) for r in rows]),
            processing_class=word_tokenizer(args.vocab),
            callbacks=[StepTimer()],
        )
        trainer.train()
    return times


def run_pairopt(
    model: nn.Module, rows: list[dict], args: argparse.Namespace, clock: Any
) -> list[float]:
    """Step times of pairopt's DPO step on the same rows, in the same batches."""
    ref = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    pairs = [PreferencePair(r["prompt"], r["chosen"] + [EOS], r["rejected"] + [EOS]) for r in rows]
    times = []
    for i in range(0, args.pairs_per_step * (args.steps + args.warmup), args.pairs_per_step):
        batch = pairs[i : i + args.pairs_per_step]
        start = clock()
        with torch.no_grad():
            reference = compute_logps(ref, batch)
        policy = compute_logps(model, batch)
        _dpo_step(policy, reference, optimizer)
        times.append(clock() - start)
    return times


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pairopt.bench.peer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--profile", default="hh_rlhf", help="a profile of pairopt/assets/profiles.json")
    p.add_argument(
        "--group-profile",
        help="a group profile (k responses per prompt) instead of --profile; see the docstring",
    )
    p.add_argument("--group-pairs", default="all", choices=GROUP_PAIRS)
    p.add_argument("--groups-per-step", type=int, default=2, help="prompts per step (groups)")
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--jitter", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_numbers(args)  # the options it shares with the bench, in the same ranges
    shape = ModelShape(
        args.hidden, args.layers, args.heads, args.heads, args.intermediate, args.vocab
    )
    check_shape(shape)
    if args.vocab < 3:  # ids 0 and 1 are <pad> and </s>: words need at least one more
        raise PairoptError(f"--vocab must be >= 3 for the peer's word tokenizer, got {args.vocab}.")
    if not 0 <= args.jitter < 1:
        raise PairoptError(f"--jitter must be in [0, 1), got {args.jitter}.")
    rows, groups, name = peer_data(args)  # bad profile names fail before TRL is needed
    try:
        import trl
    except ImportError as err:
        raise PairoptError(
            "the peer benchmark needs TRL: pip install 'pairopt[bench]' (or pip install trl)."
        ) from err
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def fresh_model() -> nn.Module:
        tokens = {"pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": None}
        return build_model(shape, device, torch.float32, args.seed, **tokens)

    trl_times = run_trl(fresh_model(), rows, args, clock)[args.warmup :]
    ours = run_pairopt(fresh_model(), rows, args, clock)[args.warmup :]
    result = {
        "command": "python -m pairopt.bench.peer "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "trl_version": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "timer": args.timer,
        "profile": name,
        "pairs_per_step": args.pairs_per_step,
        "measured_steps": args.steps,
        "trl_step_s": trl_times,
        "pairopt_step_s": ours,
        "trl_pairs_per_s": args.pairs_per_step / statistics.median(trl_times),
        "pairopt_pairs_per_s": args.pairs_per_step / statistics.median(ours),
    }
    result["ratio"] = result["pairopt_pairs_per_s"] / result["trl_pairs_per_s"]
    label = "pairopt (pair-shared)" if groups else "pairopt"
    lines = [
        f"{name}: {args.pairs_per_step} pairs/step, median over {args.steps} steps",
        f"  {'TRL ' + trl.__version__ + ' DPOTrainer':<28}{result['trl_pairs_per_s']:8.2f} pairs/s",
        f"  {label:<28}{result['pairopt_pairs_per_s']:8.2f} pairs/s",
        f"  {label + ' / TRL':<28}{result['ratio']:8.2f}x",
    ]
    if groups:
        grouped = run_pairopt_groups(fresh_model(), groups, args, clock)[args.warmup :]
        result["pairopt_group_step_s"] = grouped
        result["pairopt_group_pairs_per_s"] = args.pairs_per_step / statistics.median(grouped)
        result["group_ratio"] = result["pairopt_group_pairs_per_s"] / result["trl_pairs_per_s"]
        lines += [
            f"  {'pairopt (group-shared)':<28}{result['pairopt_group_pairs_per_s']:8.2f} pairs/s",
            f"  {'pairopt (group-shared) / TRL':<28}{result['group_ratio']:8.2f}x",
        ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'peer.json'}")
    return 0


def peer_data(
    args: argparse.Namespace,
) -> tuple[list[dict], list[tuple[ResponseGroup, list[tuple[int, int]]]], str]:
    """(pair rows, groups or [], a name): from --group-profile (setting --pairs-per-step to the
    pairs of --groups-per-step prompts), else from --profile."""
    if args.group_profile is None:
        profiles = load_profiles()
        if args.profile not in profiles:
            raise PairoptError(f"--profile {args.profile!r}: choose from {', '.join(profiles)}.")
        n = args.pairs_per_step * (args.steps + args.warmup)
        return (
            make_pairs(profiles[args.profile], n, args.jitter, args.vocab, args.seed),
            [],
            args.profile,
        )
    groups_profiles = load_group_profiles()
    if args.group_profile not in groups_profiles:
        raise PairoptError(
            f"--group-profile {args.group_profile!r}: choose from {', '.join(groups_profiles)}."
        )
    n_groups = args.groups_per_step * (args.steps + args.warmup)
    rows, groups = make_group_rows(
        groups_profiles[args.group_profile],
        n_groups,
        args.group_pairs,
        args.jitter,
        args.vocab,
        args.seed,
    )
    args.pairs_per_step = len(rows) // n_groups * args.groups_per_step  # the same k: same count
    return rows, groups, f"{args.group_profile} (pairs={args.group_pairs})"


if __name__ == "__main__":
    sys.exit(main())
