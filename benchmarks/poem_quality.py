"""What regulated verse (issue #18) costs the poems, and how much of the corpus already follows the rules.

1. Writes ``--poems`` poems of each kind with the served model (seeds 0..n-1, a quarter each of 2x5, 2x7,
   4x5 and 4x7, temperature 0.8, no top-k): free (pinyin rhyme), free without rhyme (the form alone),
   regulated classic, regulated strict; and
   scores each under the unconstrained model: the mean log-likelihood per character of the poem (every
   character after <bos>, punctuation included, and the Chinese characters alone), pooled over the poems.
   Validation poems of the same forms (the training split: 5 % after a shuffle with the manifest's seed)
   give the scale: what real poems score.
2. Classifies every training poem (the 95 %) with the same Pingshui table and patterns: the fraction that
   follows one of the four patterns (strict, classic), and the fraction whose rhymes alone are one level
   group with none repeated.

    python -m benchmarks.poem_quality [--poems 200]

Writes benchmarks/results/poem_quality.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter

import torch

from benchmarks.load import RESULTS
from service import catalog
from service.models.poem import PoemRequest
from service.models.poem.meter import Table, keep, patterns
from service.nets.char_rnn import BOS
from service.runtime.registry import open_model
from service.settings import Settings
from training.common import Options
from training.poem import load

FORMS = [(2, 5), (2, 7), (4, 5), (4, 7)]
KINDS = {
    "free": {},
    "free_no_rhyme": {"rhyme": False},
    "regulated_classic": {"meter": "regulated", "strictness": "classic"},
    "regulated_strict": {"meter": "regulated", "strictness": "strict"},
}
CLAUSE = re.compile(r"[，。？！；]")


def log_likelihood(predictor, poems: list[str]) -> dict:
    """Pooled mean log-probability per character under the served net, all characters and hanzi only."""
    total = hanzi = 0.0
    n_total = n_hanzi = 0
    per_poem = []
    unk = predictor.ids["<unk>"]
    with torch.inference_mode():
        for poem in poems:
            ids = [predictor.ids[BOS]] + [predictor.ids.get(c, unk) for c in poem]
            logits, _ = predictor.net(torch.tensor([ids[:-1]]))
            logp = torch.log_softmax(logits[0].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            is_hanzi = torch.tensor([bool(predictor.hanzi[i]) for i in ids[1:]])
            total, n_total = total + float(logp.sum()), n_total + len(poem)
            per_poem.append(float(logp.mean()))
            hanzi, n_hanzi = hanzi + float(logp[is_hanzi].sum()), n_hanzi + int(is_hanzi.sum())
    return {
        "poems": len(poems),
        "mean_log_likelihood_per_char": round(total / n_total, 4),
        "perplexity_per_char": round(float(torch.tensor(-total / n_total).exp()), 2),
        "mean_log_likelihood_per_hanzi": round(hanzi / n_hanzi, 4),
        # the spread between poems: the standard error of the mean of the per-poem means
        "standard_error_per_char": round(float(torch.tensor(per_poem).std() / len(per_poem) ** 0.5), 4),
    }


def generate(predictor, fields: dict, n: int) -> tuple[list[str], float]:
    poems, start = [], time.perf_counter()
    for seed in range(n):
        rows, length = FORMS[seed % len(FORMS)]
        (out,) = predictor.run(
            [PoemRequest(line_num=rows, line_length=length, temperature=0.8, top_k=0, seed=seed, **fields)]
        )
        poems.append(out.poem)
    return poems, time.perf_counter() - start


def clause_fits(table: Table, text: str, allowed: frozenset[str]) -> bool:
    strings = allowed
    for i, char in enumerate(text):
        strings = keep(strings, i, table.tones.get(char, frozenset()))  # unknown: must fit either tone
    return bool(strings)


def rhymes_ok(table: Table, ends: list[str]) -> bool:
    groups = set.intersection(*(set(table.groups.get(c, ())) for c in ends))
    return bool(groups) and len(set(ends)) == len(ends)


def classify(table: Table, poem: str) -> dict[str, bool]:
    texts = [t for t in CLAUSE.split(poem) if t]
    length, clauses = len(texts[0]), len(texts)
    verdict = {
        "strict": False,
        "classic": False,
        "tones_classic": False,
        "rhymes_even_clauses": rhymes_ok(table, [t[-1] for t in texts[1::2]]),
    }
    for strictness in ("strict", "classic"):
        for p in patterns(length, clauses, strictness):
            tones = all(clause_fits(table, t, a) for t, a in zip(texts, p.allowed))
            rhymes = rhymes_ok(table, [t[-1] for k, t in enumerate(texts) if p.rhymed[k]])
            verdict[strictness] |= tones and rhymes
            if strictness == "classic":
                verdict["tones_classic"] |= tones
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poems", type=int, default=200)
    args = parser.parse_args()
    entry = open_model(catalog.get("poem"), Settings().artifacts_dir)
    predictor = entry.predictor
    torch.set_num_threads(predictor.threads or torch.get_num_threads())
    hp = entry.manifest.hyperparameters
    _, train, val = load(Options(seed=hp["seed"]), hp)

    results: dict = {
        "model_version": entry.manifest.version,
        "poems_per_kind": args.poems,
        "forms": "a quarter each of 2x5, 2x7, 4x5, 4x7; temperature 0.8, top_k 0, seeds 0..n-1",
        "generated": {},
    }
    samples = {}
    for kind, fields in KINDS.items():
        poems, seconds = generate(predictor, fields, args.poems)
        samples[kind] = poems[:4]
        one_group = sum(rhymes_ok(predictor.meter.table, [t[-1] for t in CLAUSE.split(p)[1::2]]) for p in poems)
        results["generated"][kind] = {
            **log_likelihood(predictor, poems),
            "seconds": round(seconds, 1),
            "fraction_even_rhymes_in_one_pingshui_group": round(one_group / len(poems), 3),
        }
    shapes = Counter()
    real = []
    for poem in val:  # validation poems of the same forms, as many per form as generated
        texts = [t for t in CLAUSE.split(poem) if t]
        form = (len(texts) // 2, len(texts[0]))
        if shapes[form] < args.poems // len(FORMS):
            shapes[form] += 1
            real.append(poem)
    results["validation_poems_same_forms"] = log_likelihood(predictor, real)
    table = predictor.meter.table
    verdicts = [classify(table, poem) for poem in train]
    counts = Counter(k for v in verdicts for k, ok in v.items() if ok)
    results["training_poems"] = {
        "poems": len(train),
        **{
            f"fraction_{k}": round(counts[k] / len(train), 4)
            for k in ("strict", "classic", "tones_classic", "rhymes_even_clauses")
        },
    }
    unknown = Counter(c for poem in train for c in poem if "\u4e00" <= c <= "\u9fff" and c not in table.tones)
    results["training_poems"]["unknown_char_share"] = round(
        sum(unknown.values()) / sum(1 for poem in train for c in poem if "\u4e00" <= c <= "\u9fff"), 4
    )
    known = [v for poem, v in zip(train, verdicts) if not any(c in unknown for c in poem)]
    results["training_poems"]["poems_with_an_unknown_char"] = round(1 - len(known) / len(train), 4)
    results["training_poems"]["fraction_classic_among_poems_without_unknown_chars"] = round(
        sum(v["classic"] for v in known) / len(known), 4
    )
    results["samples"] = samples
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "poem_quality.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
