"""The 26 WordNet noun supersenses as 26 causal-LM tasks with one-line descriptions (the generators' bank).

Task k = language modelling of the glosses of the noun synsets in lexicographer file k (Debian
``wordnet-base``'s ``data.noun``); metric: perplexity on held-out glosses. The descriptions are the
lexicographer files' one-line descriptions from WordNet's ``lexnames(5WN)`` manual page (the data
files list the names only), e.g. ``noun.animal`` → "nouns denoting animals". ``noun.Tops`` (the 51
unique beginners) is kept as the 26th task.
"""

from __future__ import annotations

import functools

from lorakit.data.tasks import (
    LEXNAMES,
    WORDNET_INSTALL,
    WORDNET_LICENSE,
    Example,
    Task,
    _build_task,
    _dedupe,
    _wordnet_entries,
)

SUPERSENSE_DESCRIPTIONS: dict[str, str] = {
    "noun.Tops": "unique beginner for nouns",
    "noun.act": "nouns denoting acts or actions",
    "noun.animal": "nouns denoting animals",
    "noun.artifact": "nouns denoting man-made objects",
    "noun.attribute": "nouns denoting attributes of people and objects",
    "noun.body": "nouns denoting body parts",
    "noun.cognition": "nouns denoting cognitive processes and contents",
    "noun.communication": "nouns denoting communicative processes and contents",
    "noun.event": "nouns denoting natural events",
    "noun.feeling": "nouns denoting feelings and emotions",
    "noun.food": "nouns denoting foods and drinks",
    "noun.group": "nouns denoting groupings of people or objects",
    "noun.location": "nouns denoting spatial position",
    "noun.motive": "nouns denoting goals",
    "noun.object": "nouns denoting natural objects (not man-made)",
    "noun.person": "nouns denoting people",
    "noun.phenomenon": "nouns denoting natural phenomena",
    "noun.plant": "nouns denoting plants",
    "noun.possession": "nouns denoting possession and transfer of possession",
    "noun.process": "nouns denoting natural processes",
    "noun.quantity": "nouns denoting quantities and units of measure",
    "noun.relation": "nouns denoting relations between people or things or ideas",
    "noun.shape": "nouns denoting two and three dimensional shapes",
    "noun.state": "nouns denoting stable states of affairs",
    "noun.substance": "nouns denoting substances",
    "noun.time": "nouns denoting time and temporal relations",
}


@functools.cache
def _glosses() -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {name: [] for name in SUPERSENSE_DESCRIPTIONS}
    for lex, _, gloss in _wordnet_entries("data.noun"):
        name = LEXNAMES[lex]
        if gloss and name in out:
            out[name].append(Example(gloss, None))
    return {k: _dedupe(v) for k, v in out.items()}


def supersense_gloss_task(name: str, *, seed: int = 0, n_train: int | None = None,
                          n_eval: int | None = None) -> Task:
    """The LM task of supersense ``name`` (e.g. ``"noun.animal"``): its glosses, seeded split."""
    if name not in SUPERSENSE_DESCRIPTIONS:
        raise ValueError(f"unknown supersense {name!r}; known: {', '.join(SUPERSENSE_DESCRIPTIONS)}")
    meta = {"source": f"Debian wordnet-base data.noun glosses of lexicographer file {name}; install: "
                      f"{WORDNET_INSTALL}", "license": WORDNET_LICENSE,
            "notes": f"description: {SUPERSENSE_DESCRIPTIONS[name]}"}
    return _build_task(f"gloss:{name}", "lm", _glosses()[name], meta, seed=seed, n_train=n_train, n_eval=n_eval)


def supersense_task_sizes() -> dict[str, int]:
    return {k: len(v) for k, v in _glosses().items()}
