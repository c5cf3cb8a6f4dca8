"""A RULER-style synthetic long-context suite, generated locally and deterministically.

Design note
-----------
Four retrieval tasks after RULER (Hsieh et al., 2024), built from a seed with no dataset download:

- `passkey`: one pass key (a 5-digit number) hidden at a depth of filler text; ask for it.
- `multikey`: several "special magic numbers", each for a different word; ask for one word's number
  (the others are distractors of the same form).
- `multivalue`: one word with several numbers spread through the text; ask for all of them.
- `vartrack`: a chain `VAR A = 12345. VAR B = VAR A. ...` spread through the text; ask which variables
  hold the number.

Filler is varied sentences made from word lists (no digits, none of the needle words), so a needle is
the only number in the text. Lengths are measured with the model's tokenizer on the whole prompt
(chat template and answer prefix included, `add_special_tokens=False`): a prompt of nominal length L
has at most `L - reserve` tokens (room for the answer inside a context of L) and at least that minus
one filler sentence. Every prompt ends in a short answer prefix ("... The pass key is:") after the
chat template's assistant header, so a 135M instruct model answers in a few tokens. The wording was
tuned on SmolLM2-135M (dense, greedy): the pass-key question says what an answer looks like ("Answer
with the five-digit number."; without it the model answered "a small wooden box" at 4K tokens), while
the same hint or the needle's own words as prefix made it invent numbers on multi-key prompts; the
variable-tracking prefix ends in "VAR" so the model lists variable names.

`depth` is where the queried needle sits (0 = start of the filler, 1 = end) for `passkey` and
`multikey`; for `multivalue` and `vartrack` the needles are spread evenly over the text with phase
`depth` (needle j at `(depth + j / n) mod 1`), in text order for the chain.

Scoring is RULER's string match: the share of expected answers contained in the generation (1.0 or
0.0 for single-answer tasks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
LENGTHS = (2048, 4096, 8192)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_RESERVE = 64  # >= the longest answer the benchmark asks for (48 tokens)
NUM_MULTIKEYS = 4
NUM_VALUES = 4
NUM_CHAIN_VARS = 5

__all__ = [
    "TASKS",
    "LENGTHS",
    "DEPTHS",
    "Sample",
    "build_sample",
    "build_suite",
    "score",
    "summarize",
    "filler_sentences",
]


@dataclass(frozen=True)
class Sample:
    """One prompt of the suite.

    task: one of TASKS. length: nominal context length (tokens). depth: needle depth in [0, 1].
    prompt: the full text to feed the model (chat template applied, ends with the answer prefix; do not
    add special tokens when tokenising). answers: the expected strings, all of which a perfect answer
    contains. num_tokens: the prompt's length in tokens. seed: the seed the sample was drawn from.
    """

    task: str
    length: int
    depth: float
    prompt: str
    answers: tuple[str, ...]
    num_tokens: int = 0
    seed: int = 0

    def score(self, generation: str) -> float:
        return score(self.answers, generation)


def score(answers: Sequence[str], generation: str) -> float:
    """RULER string match: the share of `answers` contained in `generation` (case-insensitive)."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer; got none")
    text = generation.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# ----------------------------------------------------------------------------------------------
# Filler
# ----------------------------------------------------------------------------------------------

_SUBJECTS = (
    "The old fisherman", "A curious child", "The village baker", "Our neighbour", "The tired traveller",
    "A young painter", "The quiet librarian", "The ship's cook", "A wandering poet", "The gardener",
    "The mountain guide", "A retired teacher", "The night watchman", "The shepherd", "A street musician",
    "The weaver", "The blacksmith", "A patient nurse", "The carpenter", "The river ferryman",
)
_VERBS = (
    "carried", "painted", "repaired", "found", "described", "watched", "remembered", "cleaned",
    "admired", "sold", "borrowed", "planted", "wrapped", "studied", "forgot", "polished", "shared",
    "collected", "sketched", "mended",
)
_OBJECTS = (
    "a basket of apples", "the wooden chair", "an old map", "a bundle of letters", "the blue lantern",
    "a copper kettle", "the broken fence", "a jar of honey", "the woollen scarf", "a small boat",
    "the garden gate", "a loaf of bread", "the silver spoon", "a pile of firewood", "the faded curtain",
    "a stack of books", "the leather satchel", "a clay pot", "the iron bell", "a box of candles",
)
_PLACES = (
    "near the harbour", "behind the mill", "in the market square", "by the riverbank",
    "under the oak tree", "at the edge of the forest", "inside the chapel", "on the hilltop",
    "beside the well", "in the cellar", "along the coast road", "outside the inn", "across the bridge",
    "in the orchard", "at the train station", "by the lighthouse", "in the courtyard",
    "near the waterfall", "on the balcony", "behind the bakery",
)
_TIMES = (
    "early in the morning", "before the storm", "after supper", "at dawn", "late that evening",
    "during the festival", "while it rained", "on a windy afternoon", "in the middle of winter",
    "when the bells rang", "as the sun set", "before the market opened",
)
_REMARKS = (
    "Nobody seemed to notice.", "It was an ordinary day.", "The air smelled of salt and pine.",
    "Somewhere a dog barked.", "The clouds drifted slowly east.", "Everyone went home tired but happy.",
    "A cold wind came down from the hills.", "The streets were quiet again.",
    "Children laughed in the distance.", "The smoke from the chimneys rose straight up.",
    "It had been a long season.", "The leaves were turning gold.",
)
_TEMPLATES = (
    "{s} {v} {o} {p}.",
    "{t}, {sl} {v} {o}.",
    "{s} {v} {o} {p} {t}.",
    "{s} {v} {o}. {r}",
    "{t}, {sl} {v} {o} {p}.",
)

# Needle words: nouns that never occur in the filler.
_KEY_WORDS = (
    "comet", "falcon", "glacier", "harp", "island", "jasmine", "kettledrum", "lemur", "marble",
    "nebula", "oyster", "pelican", "quartz", "saffron", "tiger", "umbrella", "violin", "walrus",
    "yacht", "zeppelin", "anchor", "bison", "cactus", "dolphin", "emerald", "fjord", "geyser",
    "hazelnut", "iguana", "jaguar",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def filler_sentences(rng: random.Random, count: int) -> list[str]:
    """`count` varied filler sentences drawn with `rng` (no digits, no needle words)."""
    out = []
    for _ in range(count):
        subject = rng.choice(_SUBJECTS)
        sentence = rng.choice(_TEMPLATES).format(
                s=subject,
                sl=subject[0].lower() + subject[1:],
                v=rng.choice(_VERBS),
                o=rng.choice(_OBJECTS),
                p=rng.choice(_PLACES),
                t=rng.choice(_TIMES),
                r=rng.choice(_REMARKS),
        )
        out.append(sentence[0].upper() + sentence[1:])
    return out


# ----------------------------------------------------------------------------------------------
# Tasks: needles, question, answer prefix
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    intro: str
    needles: tuple[tuple[float, str], ...]  # (depth, sentence)
    question: str
    answer_prefix: str
    answers: tuple[str, ...]


def _number(rng: random.Random, used: set[str]) -> str:
    while True:
        n = str(rng.randint(10000, 99999))
        if n not in used:
            used.add(n)
            return n


def _spread(depth: float, n: int) -> list[float]:
    """n depths evenly spread with phase `depth`, sorted."""
    return sorted((depth + j / n) % 1.0 for j in range(n))


def _task_spec(task: str, depth: float, rng: random.Random) -> _Spec:
    used: set[str] = set()
    if task == "passkey":
        key = _number(rng, used)
        return _Spec(
            intro="There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it afterwards.",
            needles=((depth, f"The pass key is: {key}. Remember it. {key} is the pass key."),),
            question="What is the pass key? Answer with the five-digit number.",
            answer_prefix="The pass key is:",
            answers=(key,),
        )
    if task == "multikey":
        words = rng.sample(_KEY_WORDS, NUM_MULTIKEYS)
        values = [_number(rng, used) for _ in words]
        # Queried word at `depth`, distractors evenly around it.
        depths = [(depth + j / NUM_MULTIKEYS) % 1.0 for j in range(NUM_MULTIKEYS)]
        needles = tuple(
            (d, f"One of the special magic numbers for {w} is: {v}.") for d, w, v in zip(depths, words, values)
        )
        return _Spec(
            intro="Some special magic numbers are hidden within the following text. Make sure to memorize "
            "them. I will quiz you about the numbers afterwards.",
            needles=needles,
            # Measured on SmolLM2-135M: "One of the special magic numbers for X is:" (the needle's own
            # words) or asking for "the five-digit number" here made it invent numbers.
            question=f"What is the special magic number for {words[0]} mentioned in the provided text?",
            answer_prefix=f"The special magic number for {words[0]} is",
            answers=(values[0],),
        )
    if task == "multivalue":
        word = rng.choice(_KEY_WORDS)
        values = [_number(rng, used) for _ in range(NUM_VALUES)]
        needles = tuple(
            (d, f"One of the special magic numbers for {word} is: {v}.") for d, v in zip(_spread(depth, NUM_VALUES), values)
        )
        return _Spec(
            intro="Some special magic numbers are hidden within the following text. Make sure to memorize "
            "them. I will quiz you about the numbers afterwards.",
            needles=needles,
            question=f"What are all the special magic numbers for {word} mentioned in the provided text? "
            f"Answer with all {NUM_VALUES} five-digit numbers.",
            answer_prefix=f"The special magic numbers for {word} are:",
            answers=tuple(values),
        )
    if task == "vartrack":
        value = _number(rng, used)
        names: list[str] = []
        while len(names) < NUM_CHAIN_VARS:
            name = "".join(rng.choice(_LETTERS) for _ in range(5))
            if name not in names:
                names.append(name)
        statements = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, NUM_CHAIN_VARS)
        ]
        return _Spec(
            intro="Memorize and track the chain of variable assignments hidden in the following text.",
            needles=tuple(zip(_spread(depth, NUM_CHAIN_VARS), statements)),
            question=f"Find all variables that are assigned the value {value} in the text above.",
            answer_prefix=f"According to the chain of variable assignments in the text above, "
            f"{NUM_CHAIN_VARS} variables are assigned the value {value}, they are: VAR",
            answers=tuple(names),
        )
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


def _render(tokenizer: Any, spec: _Spec, filler: list[str], count: int) -> str:
    """Prompt with the first `count` filler sentences and the needles inserted at their depths."""
    parts: list[str] = list(filler[:count])
    # Insert from the deepest needle down so earlier insertions do not shift later indices; ties keep
    # their given order.
    order = sorted(range(len(spec.needles)), key=lambda j: (spec.needles[j][0], j), reverse=True)
    for j in order:
        d, sentence = spec.needles[j]
        parts.insert(round(d * count), sentence)
    context = " ".join(parts)
    user = f"{spec.intro}\n\n{context}\n\n{spec.question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return text + spec.answer_prefix


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_sample(
    tokenizer: Any, task: str, length: int, depth: float, seed: int, reserve: int = DEFAULT_RESERVE
) -> Sample:
    """One sample of `task` whose prompt has at most `length - reserve` tokens, as many as one more
    filler sentence would overshoot. Deterministic in (task, length, depth, seed)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth!r}")
    budget = length - reserve
    # String seeds hash with SHA-512 in Python 3: stable across processes and platforms.
    rng = random.Random(f"asynctls-suite/{seed}/{task}/{length}/{depth}")
    spec = _task_spec(task, depth, rng)
    empty = _num_tokens(tokenizer, _render(tokenizer, spec, [], 0))
    if empty > budget:
        raise ValueError(
            f"length {length} leaves no room for filler: the {task} template alone has {empty} tokens "
            f"(reserve {reserve}); use a longer length"
        )
    filler = filler_sentences(rng, max(16, budget // 4))  # a filler sentence has > 4 tokens

    def fits(count: int) -> bool:
        return _num_tokens(tokenizer, _render(tokenizer, spec, filler, count)) <= budget

    # Start from an estimate (sentence lengths tokenised one by one), bracket by doubling steps, then
    # bisect: a handful of whole-prompt tokenisations instead of a dozen.
    lengths = [len(ids) for ids in tokenizer([" " + f for f in filler], add_special_tokens=False)["input_ids"]]
    guess, total = 0, empty
    while guess < len(filler) and total + lengths[guess] <= budget:
        total += lengths[guess]
        guess += 1
    step = 2
    if fits(guess):
        lo, hi = guess, min(len(filler), guess + step)
        while hi > lo and fits(hi):
            lo, step = hi, step * 2
            hi = min(len(filler), lo + step)
        hi = hi - 1 if hi > lo else lo  # `hi` does not fit (or is the end): the answer is in [lo, hi - 1]
    else:
        hi, lo = guess - 1, max(0, guess - step)
        while lo > 0 and not fits(lo):
            hi, step = lo - 1, step * 2
            lo = max(0, hi + 1 - step)
    # Invariant: `lo` sentences fit (0 always does); the answer is in [lo, hi].
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    prompt = _render(tokenizer, spec, filler, lo)
    return Sample(task, length, depth, prompt, spec.answers, _num_tokens(tokenizer, prompt), seed)


def build_suite(
    tokenizer: Any,
    lengths: Iterable[int] = LENGTHS,
    samples_per_cell: int = 5,
    seed: int = 0,
    tasks: Iterable[str] = TASKS,
    depths: Sequence[float] = DEPTHS,
    reserve: int = DEFAULT_RESERVE,
) -> list[Sample]:
    """`samples_per_cell` samples per (task, length); sample i of a cell has depth `depths[i % len]`
    and its own seed, so a larger `samples_per_cell` extends a smaller one."""
    if samples_per_cell < 1:
        raise ValueError(f"samples_per_cell must be >= 1; got {samples_per_cell}")
    if not depths:
        raise ValueError("depths must not be empty")
    suite = []
    for task in tasks:
        for length in lengths:
            for i in range(samples_per_cell):
                suite.append(
                    build_sample(tokenizer, task, length, depths[i % len(depths)], seed * 1_000_003 + i, reserve)
                )
    return suite


def summarize(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, dict[int, float]]:
    """Mean score per task and length: {task: {length: accuracy in [0, 1]}}."""
    if len(samples) != len(scores):
        raise ValueError(f"got {len(samples)} samples but {len(scores)} scores")
    sums: dict[tuple[str, int], list[float]] = {}
    for s, v in zip(samples, scores):
        sums.setdefault((s.task, s.length), []).append(v)
    out: dict[str, dict[int, float]] = {}
    for (task, length), values in sums.items():
        out.setdefault(task, {})[length] = sum(values) / len(values)
    return out
