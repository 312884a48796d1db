"""Regenerate the shipped tiny assets, deterministically: `python -m pairopt.assets.build`.

- `tiny-prefs/{train,test}.jsonl`: synthetic preference pairs in the standard format
  (`prompt`, `chosen`, `rejected` strings, plus `kind`, which loaders ignore). Three kinds of
  pair, each differing on one axis only: `tone` (same content; chosen polite, rejected rude),
  `format` (the prompt asks for a sentence or for a list; chosen obeys, rejected uses the other
  form; same words) and `topic` (chosen about the place the prompt asks about, rejected about
  another one). Tone can be learnt without reading the prompt; format and topic cannot (a model
  blind to the prompt scores 50% on them), so held-out accuracy well above the tone share shows
  that the model conditions on the prompt.
- `tiny-prefs-groups/{train,test}.jsonl`: the same kind of prompts, each with 3 to 6 responses
  that differ in topic, tone and form at once, and a score per response (the ranked format:
  `prompt`, `responses`, `scores`), from its own random stream (`GROUP_SEED`), so adding it left
  `tiny-prefs` and the tokenizer unchanged.
- `tiny-llama/`: `config.json` of a tiny `LlamaForCausalLM` (no weights: the trainer builds it
  with `from_config` and a seed) and a byte-level BPE tokenizer trained on the dataset text, with
  BOS/EOS/PAD and a small chat template so conversational data works too.

Everything comes from `random.Random(SEED)` and the `tokenizers` trainer, which is
deterministic for a given input order; `tests/test_data.py` checks that the committed files load.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SEED = 1234
N_TRAIN = 3000
N_TEST = 300
KIND_WEIGHTS = {"tone": 0.4, "topic": 0.3, "format": 0.3}
VOCAB_SIZE = 1536  # upper bound for the BPE trainer; it stops once every dataset word is one token

# topic -> (things found there, qualities). Things are unique to a topic (they identify it);
# qualities are shared on purpose (they do not). Eight topics, not more: the tiny model learns
# which response words go with which prompt topic from examples (~110 per topic per epoch); with
# 32 topics held-out topic accuracy was ~0.6 after 200 steps, with 8 it is ~0.8.
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "garden": (["flowers", "roses", "seeds", "soil"], ["green", "quiet", "fresh"]),
    "ocean": (["waves", "whales", "salt", "coral"], ["deep", "blue", "wild"]),
    "forest": (["trees", "moss", "owls", "leaves"], ["dark", "old", "dense"]),
    "city": (["streets", "buses", "towers", "lights"], ["busy", "loud", "bright"]),
    "kitchen": (["pans", "spices", "knives", "plates"], ["warm", "clean", "small"]),
    "library": (["books", "shelves", "maps", "desks"], ["silent", "calm", "large"]),
    "mountain": (["peaks", "snow", "goats", "cliffs"], ["high", "steep", "cold"]),
    "desert": (["sand", "dunes", "camels", "cactus"], ["dry", "hot", "empty"]),
}

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack"]
DAYS = ["Monday", "Tuesday", "Friday", "weekend", "summer", "winter", "spring", "autumn"]

# Context sentences about a topic; {T} topic, {a}/{b} things of it, {q} a quality.
ABOUT = [
    "I visited the {T} last {day}.",
    "The {a} in the {T} were {q}.",
    "My friend {name} loves the {a} there.",
    "We saw many {a} and {b} near the {T}.",
    "Everyone says the {T} is {q}.",
    "There are so many {a} in the {T}.",
    "{name} took a photo of the {a}.",
    "The {T} felt {q} in the morning.",
    "I still remember the {a} and the {b}.",
    "We walked around the {T} for hours.",
]
FILLER = [
    "It was a long week at work.",
    "My friend called me this morning.",
    "I have a little free time today.",
    "The weather has been strange lately.",
    "I want to learn something new.",
    "My sister asked me to write this down.",
    "I am planning a trip with my family.",
    "We had tea and talked for a while.",
    "Yesterday I finally finished my work.",
    "I keep thinking about it.",
    "{name} said I should ask you.",
    "It rained all day on {day}.",
]
REQUESTS = [
    "Can you tell me about the {T}?",
    "Please describe the {T} for me.",
    "What is special about the {T}?",
    "Write a short note about the {T}.",
    "What should I know about the {T}?",
    "Could you say something about the {T}?",
]
# Response content about a topic (one or two of these per response).
CONTENT = [
    "The {T} is {q} and full of {a}.",
    "You will find {a} and {b} in the {T}.",
    "Many people enjoy the {a} of the {T}.",
    "The {a} make the {T} feel {q}.",
    "In the {T} the {a} are {q}.",
    "Visit the {T} to see the {a} and the {b}.",
]
# Tone phrases: each polite list has the same multiset of lengths (words + punctuation, one
# token each) as its rude counterpart, so response length says nothing about the preference
# (a length-biased set would give reference-free losses a head start at initialisation).
POLITE_OPEN = ["Certainly.", "Gladly.", "Of course.", "Great question.", "With pleasure.",
               "Good idea.", "Thank you for asking.", "Sure, happy to help."]  # fmt: skip
RUDE_OPEN = ["Whatever.", "Seriously?", "Boring question.", "So annoying.", "Not again.",
             "How tedious.", "If I really must.", "Why do you even ask?"]  # fmt: skip
POLITE_CLOSE = ["Enjoy your visit.", "I hope this helps.", "Have a lovely day.",
                "Thanks for the question.", "Feel free to ask again.",
                "Let me know if you want more."]  # fmt: skip
RUDE_CLOSE = ["Stop bothering me.", "Now leave me alone.", "Do not ask again.",
              "Go ask someone else.", "Figure out the rest yourself.",
              "That is all you get from me."]  # fmt: skip
FORMAT_ASK = {
    "sentence": [
        "Answer in one sentence.",
        "Reply with a full sentence.",
        "Use a complete sentence.",
    ],
    "list": ["Answer with a list.", "Reply with a short list.", "Just list the things."],
}
TOPIC_NAMES = sorted(TOPICS)


def _fill(template: str, rng: random.Random, topic: str) -> str:
    things, qualities = TOPICS[topic]
    a, b = rng.sample(things, 2)
    return template.format(
        T=topic, a=a, b=b, q=rng.choice(qualities), name=rng.choice(NAMES), day=rng.choice(DAYS)
    )


def _context(rng: random.Random, topic: str, n: int) -> list[str]:
    """n context sentences: mostly about the topic, some filler (1 to 12 sentences ~ 8-100 tokens)."""
    out = []
    for _ in range(n):
        pool = ABOUT if rng.random() < 0.7 else FILLER
        out.append(_fill(rng.choice(pool), rng, topic))
    return out


def _n_sentences(rng: random.Random) -> int:
    # Skewed towards short prompts with a long tail, so prefix sharing has something to share.
    return min(12, 1 + int(rng.expovariate(1 / 3.5)))


def _content(rng: random.Random, topic: str, templates: list[int]) -> str:
    return " ".join(_fill(CONTENT[i], rng, topic) for i in templates)


def make_pair(rng: random.Random, kind: str) -> dict[str, str]:
    topic = rng.choice(TOPIC_NAMES)
    context = _context(rng, topic, _n_sentences(rng))
    prompt = " ".join([*context, _fill(rng.choice(REQUESTS), rng, topic)])
    if kind == "format":
        asked = rng.choice(["sentence", "list"])
        prompt += " " + rng.choice(FORMAT_ASK[asked])
        sentence = _content(rng, topic, [rng.randrange(len(CONTENT))])
        things = rng.sample(TOPICS[topic][0], rng.choice([3, 4]))
        listed = ", ".join(things[:-1]) + " and " + things[-1] + "."
        chosen, rejected = (sentence, listed) if asked == "sentence" else (listed, sentence)
        return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected, "kind": kind}
    templates = rng.sample(range(len(CONTENT)), rng.choice([1, 1, 2]))
    if kind == "tone":
        body = _content(rng, topic, templates)
        shape = rng.choice(["open", "close", "both"])
        parts_c, parts_r = [body], [body]
        if shape in ("open", "both"):
            parts_c.insert(0, rng.choice(POLITE_OPEN))
            parts_r.insert(0, rng.choice(RUDE_OPEN))
        if shape in ("close", "both"):
            parts_c.append(rng.choice(POLITE_CLOSE))
            parts_r.append(rng.choice(RUDE_CLOSE))
        chosen, rejected = " ".join(parts_c), " ".join(parts_r)
    else:  # topic: same tone and shape, the content is about the asked topic or another one
        other = rng.choice([t for t in TOPIC_NAMES if t != topic])
        opener = rng.choice(POLITE_OPEN) + " " if rng.random() < 0.5 else ""
        chosen = opener + _content(rng, topic, templates)
        rejected = opener + _content(rng, other, templates)
    return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected, "kind": kind}


def make_pairs(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and test pairs; no test prompt occurs in train, so test pairs are new combinations."""
    rng = random.Random(seed)
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())

    def stream() -> Iterator[dict[str, str]]:
        while True:
            yield make_pair(rng, rng.choices(kinds, weights)[0])

    seen: set[str] = set()
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for pair in stream():
        if pair["prompt"] in seen or pair["chosen"] == pair["rejected"]:
            continue
        seen.add(pair["prompt"])
        (test if len(test) < N_TEST else train).append(pair)
        if len(train) == N_TRAIN:
            return train, test
    raise AssertionError("unreachable")


# -- tiny-prefs-groups: one prompt, k scored responses ------------------------------------------

GROUP_SEED = (
    SEED + 1
)  # its own stream: tiny-prefs (and the tokenizer trained on it) stay as they are
N_TRAIN_GROUPS = 1000
N_TEST_GROUPS = 200
GROUP_SIZES = [3, 4, 4, 5, 6]  # k per prompt: mixed sizes, ~4.4 on average
FORMAT_SHARE = 0.4  # prompts that ask for a sentence or a list
TONE_POINTS = {"polite": 2, "plain": 1, "rude": 0}


def _group_response(
    rng: random.Random,
    topic: str,
    other: str,
    templates: list[int],
    asked: str | None,
    combo: tuple,
) -> tuple[str, int]:
    """One response and its score: 2 + 4 (right topic) + 2 (asked form) + tone (0..2)."""
    topic_ok, tone, form_ok = combo
    about = topic if topic_ok else other
    if asked is None:
        body = _content(rng, about, templates)
    else:
        sentence = _content(rng, about, [templates[0]])
        things = rng.sample(TOPICS[about][0], rng.choice([3, 4]))
        listed = ", ".join(things[:-1]) + " and " + things[-1] + "."
        body = sentence if (asked == "sentence") == form_ok else listed
    parts = [body]
    if tone != "plain":
        opener, closer = (
            (POLITE_OPEN, POLITE_CLOSE) if tone == "polite" else (RUDE_OPEN, RUDE_CLOSE)
        )
        if rng.random() < 0.7:
            parts.insert(0, rng.choice(opener))
        if len(parts) == 1 or rng.random() < 0.5:
            parts.append(rng.choice(closer))
    score = 2 + 4 * topic_ok + 2 * form_ok + TONE_POINTS[tone]
    return " " + " ".join(parts), score


def make_group(rng: random.Random) -> dict[str, Any]:
    """A prompt about a place and k responses that differ in topic, tone and (when the prompt
    asks for one) form, scored like a rating: higher is better, ties possible."""
    topic = rng.choice(TOPIC_NAMES)
    prompt = " ".join(
        [*_context(rng, topic, _n_sentences(rng)), _fill(rng.choice(REQUESTS), rng, topic)]
    )
    asked = rng.choice(["sentence", "list"]) if rng.random() < FORMAT_SHARE else None
    if asked is not None:
        prompt += " " + rng.choice(FORMAT_ASK[asked])
    other = rng.choice([t for t in TOPIC_NAMES if t != topic])
    templates = rng.sample(range(len(CONTENT)), rng.choice([1, 1, 2]))
    forms = [True, False] if asked is not None else [True]
    combos = [(t, tone, f) for t in (True, False) for tone in TONE_POINTS for f in forms]
    picked = rng.sample(combos, min(rng.choice(GROUP_SIZES), len(combos)))
    responses, scores = [], []
    for combo in picked:
        text, score = _group_response(rng, topic, other, templates, asked, combo)
        if text not in responses:
            responses.append(text)
            scores.append(score)
    return {"prompt": prompt, "responses": responses, "scores": scores, "asks": asked or "nothing"}


def make_groups(seed: int = GROUP_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test groups; every prompt occurs once, and no group has all scores tied."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    while len(train) < N_TRAIN_GROUPS:
        group = make_group(rng)
        if group["prompt"] in seen or len(set(group["scores"])) < 2:
            continue
        seen.add(group["prompt"])
        (test if len(test) < N_TEST_GROUPS else train).append(group)
    return train, test


# A minimal chat template: role markers are special tokens, an assistant turn ends with EOS and
# nothing after it (so the rendered response ends with EOS and none is appended twice).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(texts: list[str], out: Path) -> int:
    """Train a byte-level BPE on `texts`, save it for `AutoTokenizer`; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # BOS is added to whatever is tokenised with special tokens (the prompt; docs/configuration.md, Data).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out))
    # Name the class by its long-standing alias: transformers 5 maps it to its tokenizers backend.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size()


def build_model_config(vocab_size: int, out: Path) -> None:
    """A ~0.2M-parameter Llama; shape chosen so DPO learns tiny-prefs in ~1 min on 2 CPU cores."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64,  # padded to a multiple of 64, as real models do
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the models users bring
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(out))


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="assets folder")
    args = parser.parse_args(argv)

    train, test = make_pairs()
    prefs, llama = args.out / "tiny-prefs", args.out / "tiny-llama"
    prefs.mkdir(parents=True, exist_ok=True)
    llama.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, prefs / "train.jsonl")
    write_jsonl(test, prefs / "test.jsonl")
    groups_dir = args.out / "tiny-prefs-groups"
    groups_dir.mkdir(parents=True, exist_ok=True)
    train_groups, test_groups = make_groups()
    write_jsonl(train_groups, groups_dir / "train.jsonl")
    write_jsonl(test_groups, groups_dir / "test.jsonl")

    texts = [r[k] for r in train + test for k in ("prompt", "chosen", "rejected")]
    vocab_size = build_tokenizer(texts, llama)
    build_model_config(vocab_size, llama)
    print(
        f"wrote {len(train)} train + {len(test)} test pairs to {prefs}; {len(train_groups)} + "
        f"{len(test_groups)} groups to {groups_dir}; tokenizer ({vocab_size} tokens) and config "
        f"to {llama}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
