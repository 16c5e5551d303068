#!/usr/bin/env python3
"""Tokenizer benchmark: extending a base tokenizer with a domain's words, as ratios.

    python benchmarks/tokenizer.py                 # bench-100m base, 40,000 + 4,000 lines; bpb on 'small' (minutes on 2 cores)
    python benchmarks/tokenizer.py --quick         # 'small' base, 6,000 + 600 lines (about 2 minutes on 2 cores)
    python benchmarks/tokenizer.py --write-corpus F --lines N   # write N lines of the domain corpus and stop

The domain: pharmacology text generated here, offline: drug names composed from morphemes (a
stem and a class suffix, "-gliflozin", "-zumab", "-prazole"...), conditions ("glomerulonephritis",
"hyperkalaemia"), enzymes ("thymidylate synthase"), receptors and units with Greek letters and
subscripts ("β₂-adrenergic", "µmol/L"), in English sentences. The base tokenizer was trained on
``trainer/base.py``'s synthetic English and never saw any of it. The lexicon is drawn once and
its terms are used with Zipf frequencies, so the held-out text (its own sentences, drawn with
another seed, written to its own file) shares the domain's vocabulary but not its sentences.

A base is built from a preset (``build_base``), then ``extend_tokenizer`` adds at most 2,000
tokens chosen on the selection text only. Measured on the held-out text:

- ``fertility_after_vs_before``: tokens per word of the extended tokenizer / the base's
  (target <= 0.75, a cut of at least 25%).
- ``decode_chars_per_s_vs_base``: characters per second decoding the held-out lines (one
  ``tokenizer.decode`` call per line, as a server detokenizes a response) with the extended
  tokenizer on its own ids / the base on its ids; best of 5 interleaved rounds. Reported, no target.
- ``bpb_tokenizer_vs_lora_only``: held-out loss in bits per UTF-8 byte (total NLL in nats / ln 2
  / the held-out text's bytes, each side with its own tokenizer, so the vocabularies compare) of
  (a) a tokenizer module with a LoRA component (``tunehub train`` with ``tokenizer: {extend:
  ...}``: at most ``bpb_max_new`` tokens chosen on the training text, their rows trained with the
  LoRA) / (b) a LoRA-only module, both trained on the same text for the same steps, at the same
  learning rate, with (b)'s rank raised until its trainable parameters match (a)'s LoRA plus
  new rows (both counts are printed). Target < 1.0. The base is built here: a random model, so
  this measures how much of the domain each budget learns from scratch, not a pretrained
  model's transfer.

The last stdout line is one line of JSON: ``{"benchmark": "tokenizer", "ratios": {...}, "figures": {...}}``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCHMARK = "tokenizer"
MAX_NEW = 2000
FERTILITY_TARGET = 0.75
BPB_TARGET = 1.0


@dataclass(frozen=True)
class Sizes:
    name: str
    preset: str
    lines: int  # selection text
    heldout_lines: int
    decode_rounds: int
    # bits per byte: the base trained on (built here), steps, and the tokenizer module's budget
    bpb_preset: str
    bpb_steps: int
    bpb_max_new: int
    bpb_rank: int  # the tokenizer module's LoRA rank; the LoRA-only module's is raised to match
    bpb_batch: int = 8
    bpb_max_length: int = 128
    bpb_learning_rate: float = 3e-3


FULL = Sizes("full", "bench-100m", 40000, 4000, 5, bpb_preset="small", bpb_steps=600, bpb_max_new=2000, bpb_rank=8)
QUICK = Sizes("quick", "small", 6000, 600, 5, bpb_preset="small", bpb_steps=150, bpb_max_new=1000, bpb_rank=8)

# --- the domain corpus -------------------------------------------------------------------------------

_STEMS = (
    "abe", "aci", "ala", "ambri", "ami", "ato", "bexa", "bosu", "cani", "cefu", "dapa", "dexa", "dolu",
    "empa", "eso", "etora", "fexo", "flu", "gli", "ibu", "indo", "ivaca", "keto", "lami", "levo", "lina",
    "lora", "meto", "mira", "napro", "nebi", "olmi", "pano", "pimo", "rami", "riva", "rosu", "saxa",
    "sita", "suma", "tamsu", "teri", "tica", "valsa", "zafi", "xeno", "quina", "umecli",
)  # fmt: skip
_LINKS = ("", "ti", "pra", "ri", "vo", "xi", "da", "ne", "lo", "fi", "co", "mu")
_CLASS_SUFFIXES = (
    "mab", "nib", "pril", "sartan", "olol", "azepam", "cillin", "mycin", "vir", "tide", "statin",
    "prazole", "dipine", "gliptin", "gliflozin", "parin", "floxacin", "tinib", "zumab", "ximab",
    "caine", "triptan", "semide", "thiazide", "oxetine", "profen",
)  # fmt: skip
_ORGANS = (
    "cardi", "nephr", "hepat", "gastr", "neur", "dermat", "pneumon", "oste", "arthr", "encephal",
    "myocard", "pancreat", "cholecyst", "col", "laryng", "pharyng", "mening", "thyroid", "lymphaden",
    "endocard", "pericard", "glomerulonephr", "esophag", "duoden", "myel", "retin", "splen",
)  # fmt: skip
_ORGAN_SUFFIXES = ("itis", "osis", "opathy", "algia", "ectomy", "omegaly", "oma", "ostomy", "ography", "osclerosis")
_BLOOD = ("kal", "natr", "calc", "glyc", "lipid", "uric", "phosphat", "magnes", "album", "bilirubin")
_SUBSTRATES = (
    "phosphodiester", "glucosid", "lact", "tryptophan hydroxyl", "tyrosine kin", "glutamyl transpept",
    "acetylcholinester", "cyclooxygen", "monoamine oxid", "xanthine oxid", "carbonic anhydr", "aldose reduct",
    "thymidylate synth", "topoisomer", "dihydrofolate reduct", "β-lactam", "α-glucosid", "HMG-CoA reduct",
)  # fmt: skip
_CLASSES = (
    "β-blocker", "ACE inhibitor", "angiotensin receptor blocker", "proton pump inhibitor", "statin",
    "monoclonal antibody", "kinase inhibitor", "SGLT2 inhibitor", "DPP-4 inhibitor", "calcium channel blocker",
    "loop diuretic", "fluoroquinolone", "macrolide", "cephalosporin", "anticoagulant", "benzodiazepine",
)  # fmt: skip
_RECEPTORS = ("5-HT₃", "D₂", "μ-opioid", "GABA-A", "H₁", "NMDA", "β₂-adrenergic", "muscarinic M₃", "α₁-adrenergic", "κ-opioid")
_TISSUES = ("hepatic", "renal", "myocardial", "pulmonary", "gastric", "cortical", "synovial", "retinal", "splenic")
_OUTCOMES = ("reduced", "increased", "did not change", "halved", "doubled", "normalised")


def _lexicon(rng: random.Random) -> dict[str, list[str]]:
    drugs = sorted({rng.choice(_STEMS) + rng.choice(_LINKS) + rng.choice(_CLASS_SUFFIXES) for _ in range(5000)})
    rng.shuffle(drugs)  # Zipf rank: a random order, not the alphabetical one
    conditions = [organ + suffix for organ in _ORGANS for suffix in _ORGAN_SUFFIXES]
    conditions += [f"{side}{blood}aemia" for side in ("hyper", "hypo") for blood in _BLOOD]
    rng.shuffle(conditions)
    enzymes = [substrate + "ase" for substrate in _SUBSTRATES]
    return {"drug": drugs, "condition": conditions, "enzyme": enzymes}


class _Zipf:
    """Draws from a list with Zipf(s) weights over its order (inverse CDF, bisected)."""

    def __init__(self, items: list[str], s: float = 1.05):
        self.items = items
        self.cdf = list(itertools.accumulate(rank**-s for rank in range(1, len(items) + 1)))

    def draw(self, rng: random.Random) -> str:
        return self.items[bisect.bisect_left(self.cdf, rng.random() * self.cdf[-1])]


def _sentence(rng: random.Random, lex: dict[str, list[str]], zipf: dict[str, _Zipf]) -> str:
    def drug() -> str:
        return zipf["drug"].draw(rng)

    def cond() -> str:
        return zipf["condition"].draw(rng)

    def enzyme() -> str:
        return rng.choice(lex["enzyme"])

    shape = rng.randrange(8)
    if shape == 0:
        text = f"Patients with {cond()} received {rng.choice((5, 10, 20, 40, 80))} mg of {drug()} twice daily."
    elif shape == 1:
        text = f"{drug()} is a {rng.choice(_CLASSES)} that inhibits {enzyme()} in {rng.choice(_TISSUES)} tissue."
    elif shape == 2:
        text = f"Co-administration of {drug()} and {drug()} increased the risk of {cond()}."
    elif shape == 3:
        text = (
            f"In a randomised trial, {drug()} {rng.choice(_OUTCOMES)} {cond()} by {rng.randint(5, 60)}% compared with {drug()}."
        )
    elif shape == 4:
        text = f"The IC₅₀ of {drug()} against {enzyme()} was {rng.randint(1, 900) / 10} µmol/L."
    elif shape == 5:
        text = f"Monitor for {cond()} when {drug()} is combined with a {rng.choice(_CLASSES)}."
    elif shape == 6:
        text = f"{drug()} showed high affinity for the {rng.choice(_RECEPTORS)} receptor and caused {cond()} in {rng.randint(1, 9)}% of rats."
    else:
        text = f"Dose adjustment of {drug()} is needed in {cond()}; {drug()} needs none."
    return text[0].upper() + text[1:]


def domain_corpus(num_lines: int, seed: int, lexicon_seed: int = 0) -> list[str]:
    """``num_lines`` lines (one or two sentences) of generated pharmacology text. Lines of two
    seeds share the lexicon (``lexicon_seed``), not their sentences."""
    lex = _lexicon(random.Random(lexicon_seed))
    zipf = {name: _Zipf(lex[name]) for name in ("drug", "condition")}
    rng = random.Random(seed)
    return [" ".join(_sentence(rng, lex, zipf) for _ in range(rng.randint(1, 2))) for _ in range(num_lines)]


# --- measuring ---------------------------------------------------------------------------------------


def _decode_chars_per_s(tokenizer: Any, ids: list[list[int]], chars: int) -> float:
    start = time.perf_counter()
    for row in ids:
        tokenizer.decode(row)
    return chars / (time.perf_counter() - start)


def lora_params_per_rank(base: Path) -> int:
    """Trainable parameters one unit of LoRA rank adds on ``base`` with target_modules all-linear
    (PEFT leaves the output head out): the sum of in + out features of its linear layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    head = model.get_output_embeddings()
    return sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def bits_per_byte(model: Any, tokenizer: Any, lines: list[str], batch: int = 16) -> tuple[float, int]:
    """Total next-token NLL of ``lines`` (each its own sequence, the first token given) in bits,
    per UTF-8 byte of the lines; and how many tokens were predicted."""
    import math

    import torch

    model.eval()
    nats, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(lines), batch):
            enc = tokenizer(lines[start : start + batch], return_tensors="pt", padding=True)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float()
            labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            nats += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            predicted += int((labels != -100).sum())
    total_bytes = sum(len(line.encode("utf-8")) for line in lines)
    return nats / math.log(2) / total_bytes, predicted


def run_bpb(work: Path, sizes: Sizes, corpus: Path, heldout: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a) tokenizer module with a LoRA component vs (b) LoRA only, same steps and parameter budget."""
    from transformers import AutoTokenizer

    from tunehub.trainer.base import build_base
    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.run import train

    base = work / f"base-{sizes.bpb_preset}"
    if not base.exists():
        build_base(base, sizes.bpb_preset)
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    per_rank = lora_params_per_rank(base)

    def config(name: str, rank: int, extend: bool) -> Any:
        raw: dict[str, Any] = {
            "base": {"path": str(base)},
            "method": {"name": "lora", "r": rank, "alpha": 2 * rank, "dropout": 0.0},
            "objective": {"name": "clm"},
            "data": {"train": str(corpus), "eval_fraction": 0.02, "max_length": sizes.bpb_max_length},
            "training": {
                "max_steps": sizes.bpb_steps,
                "batch_size": sizes.bpb_batch,
                "learning_rate": sizes.bpb_learning_rate,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.05,
                "logging_steps": 25,
                "save_steps": 10 * sizes.bpb_steps,  # no checkpoint: nothing resumes here
            },
            "output": {"dir": str(work / name)},
        }
        if extend:  # words chosen on the training text only; the held-out file is where fertility is measured
            raw["tokenizer"] = {"extend": {"corpus": str(corpus), "max_new": sizes.bpb_max_new, "heldout": str(heldout)}}
        return validate_run_config(raw)

    lines = heldout.read_text(encoding="utf-8").splitlines()
    print(f"training (a) tokenizer module + LoRA r={sizes.bpb_rank}, {sizes.bpb_steps} steps ...", file=sys.stderr)
    start = time.perf_counter()
    with_vocab = train(config("bpb-tokenizer", sizes.bpb_rank, True))
    seconds_a = time.perf_counter() - start
    added = int(with_vocab.manifest.params["added"]) if with_vocab.manifest else 0
    rows = added * hidden * (1 if with_vocab.manifest and with_vocab.manifest.params["tied_head"] else 2)
    rank_b = max(1, round(sizes.bpb_rank + rows / per_rank))
    print(f"training (b) LoRA-only r={rank_b} (same budget), {sizes.bpb_steps} steps ...", file=sys.stderr)
    start = time.perf_counter()
    lora_only = train(config("bpb-lora", rank_b, False))
    seconds_b = time.perf_counter() - start
    bpb_a, tokens_a = bits_per_byte(with_vocab.model, AutoTokenizer.from_pretrained(with_vocab.module_dir), lines)
    bpb_b, tokens_b = bits_per_byte(lora_only.model, AutoTokenizer.from_pretrained(base), lines)
    ratio = bpb_a / bpb_b
    entry = {"value": round(ratio, 4), "target": f"< {BPB_TARGET}", "pass": ratio < BPB_TARGET}
    figures = {
        "base_preset": sizes.bpb_preset,
        "steps": sizes.bpb_steps,
        "batch": sizes.bpb_batch,
        "max_length": sizes.bpb_max_length,
        "learning_rate": sizes.bpb_learning_rate,
        "added_tokens": added,
        "trainable_params": {
            "tokenizer_module": int(with_vocab.metrics["trainable_params"]),
            "tokenizer_module_lora": sizes.bpb_rank * per_rank,
            "tokenizer_module_rows": rows,
            "lora_only": int(lora_only.metrics["trainable_params"]),
        },
        "lora_rank": {"tokenizer_module": sizes.bpb_rank, "lora_only": rank_b},
        "heldout_bits_per_byte": {"tokenizer_module": round(bpb_a, 4), "lora_only": round(bpb_b, 4)},
        "heldout_tokens_predicted": {"tokenizer_module": tokens_a, "lora_only": tokens_b},
        "final_train_loss": {
            "tokenizer_module": round(with_vocab.metrics.get("final_train_loss", float("nan")), 4),
            "lora_only": round(lora_only.metrics.get("final_train_loss", float("nan")), 4),
        },
        "module_bytes": {
            "tokenizer_module": sum(p.stat().st_size for p in with_vocab.module_dir.iterdir()),
            "lora_only": sum(p.stat().st_size for p in lora_only.module_dir.iterdir()),
        },
        "seconds": {"tokenizer_module": round(seconds_a, 1), "lora_only": round(seconds_b, 1)},
    }
    return entry, figures


def run(work: Path, sizes: Sizes, *, bpb: bool = True) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tunehub.trainer.base import build_base
    from tunehub.trainer.tokenizers import extend_tokenizer

    started = time.perf_counter()
    corpus, heldout = work / "domain.txt", work / "domain-heldout.txt"
    corpus.write_text("\n".join(domain_corpus(sizes.lines, seed=1)) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(domain_corpus(sizes.heldout_lines, seed=2)) + "\n", encoding="utf-8")
    print(f"building the {sizes.preset} base ...", file=sys.stderr)
    base = build_base(work / f"base-{sizes.preset}", sizes.preset, overwrite=True)
    built = time.perf_counter()
    print(f"extending its tokenizer with at most {MAX_NEW} tokens ...", file=sys.stderr)
    out = work / "extended"
    if out.exists():
        shutil.rmtree(out)
    report = extend_tokenizer(base, corpus, MAX_NEW, out, heldout=heldout)
    extended_s = time.perf_counter() - built

    lines = heldout.read_text(encoding="utf-8").splitlines()
    chars = sum(map(len, lines))
    sides = {"base": AutoTokenizer.from_pretrained(base), "extended": AutoTokenizer.from_pretrained(out)}
    ids = {name: [tok(line, add_special_tokens=False)["input_ids"] for line in lines] for name, tok in sides.items()}
    same_text = all(sides["extended"].decode(row) == line for row, line in zip(ids["extended"], lines))
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(sizes.decode_rounds):  # interleaved rounds: a busy moment hurts both sides
        for name, tok in sides.items():
            runs[name].append(_decode_chars_per_s(tok, ids[name], chars))
    best = {name: max(values) for name, values in runs.items()}

    fertility = report.fertility_ratio
    lex = _lexicon(random.Random(0))
    terms = {*lex["drug"], *lex["condition"], *(word for enzyme in lex["enzyme"] for word in enzyme.split())}
    jargon = sum(token.token.strip() in terms for token in report.added)
    ratios = {
        "fertility_after_vs_before": {
            "value": round(fertility, 4),
            "target": f"<= {FERTILITY_TARGET}",
            "pass": fertility <= FERTILITY_TARGET,
        },
        "decode_chars_per_s_vs_base": {
            "value": round(best["extended"] / best["base"], 4),
            "target": "reported",
            "pass": None,
        },
    }
    bpb_figures = None
    if bpb:
        bpb_started = time.perf_counter()
        ratios["bpb_tokenizer_vs_lora_only"], bpb_figures = run_bpb(work, sizes, corpus, heldout)
        bpb_seconds = time.perf_counter() - bpb_started
    else:
        ratios["bpb_tokenizer_vs_lora_only"] = {"value": None, "target": f"< {BPB_TARGET}", "pass": None, "note": "--no-bpb"}
    figures = {
        "sizes": sizes.name,
        "base_preset": sizes.preset,
        "corpus": {"selection_lines": sizes.lines, "heldout_lines": sizes.heldout_lines, "heldout_chars": chars},
        "max_new": MAX_NEW,
        "added_tokens": len(report.added),
        "base_vocab": report.base_vocab_size,
        "extended_vocab": report.vocab_size,
        "heldout_before": report.before.to_dict(),
        "heldout_after": report.after.to_dict(),
        "bytes_per_token_after_vs_before": round(report.after.bytes_per_token / report.before.bytes_per_token, 4),
        "heldout_decode_round_trips_exactly": same_text and report.after.roundtrip,
        "decode_chars_per_s": {name: round(value) for name, value in best.items()},
        "decode_chars_per_s_runs": {name: [round(v) for v in values] for name, values in runs.items()},
        # the base tokenizer was trained on a small synthetic English, so some plain English words
        # ("of", "with") split badly too and are chosen: this share is the lexicon's
        "added_domain_terms_share": round(jargon / max(len(report.added), 1), 4),
        "top_added": [{"token": t.token, "pieces": len(t.piece_ids), "count": t.count} for t in report.added[:10]],
        "seconds": {
            "build_base": round(built - started, 1),
            "extend": round(extended_s, 1),
            "bpb": round(bpb_seconds, 1) if bpb else None,
            "total": round(time.perf_counter() - started, 1),
        },
        "bpb": bpb_figures,
        "sizes_detail": asdict(sizes),
    }
    return {"benchmark": BENCHMARK, "ratios": ratios, "figures": figures}


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140, stderr=False)
    fig = report["figures"]
    before, after = fig["heldout_before"], fig["heldout_after"]
    table = Table(
        title=f"held-out domain text ({fig['sizes']} run: {fig['base_preset']} base, {fig['added_tokens']} tokens added)"
    )
    for column in ("measure", "base", "extended", "after/before"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        "tokens per word",
        f"{before['fertility']:.3f}",
        f"{after['fertility']:.3f}",
        f"{after['fertility'] / before['fertility']:.3f}",
    )
    table.add_row(
        "bytes per token",
        f"{before['bytes_per_token']:.3f}",
        f"{after['bytes_per_token']:.3f}",
        f"{fig['bytes_per_token_after_vs_before']:.3f}",
    )
    table.add_row(
        "decode chars/s",
        f"{fig['decode_chars_per_s']['base']:,}",
        f"{fig['decode_chars_per_s']['extended']:,}",
        f"{report['ratios']['decode_chars_per_s_vs_base']['value']:.3f}",
    )
    console.print(table)
    verdicts = Table(title="verdict")
    for column in ("ratio", "value", "target", "result"):
        verdicts.add_column(column)
    for name, entry in report["ratios"].items():
        value = "not measured yet" if entry["value"] is None else f"{entry['value']:.3f}"
        result = "" if entry["pass"] is None else ("[green]PASS" if entry["pass"] else "[red]FAIL")
        verdicts.add_row(name, value, entry["target"], result)
    console.print(verdicts)
    bpb = fig.get("bpb")
    if bpb:
        counts, ranks = bpb["trainable_params"], bpb["lora_rank"]
        console.print(
            f"bits per byte on held-out text after {bpb['steps']} steps: tokenizer module"
            f" {bpb['heldout_bits_per_byte']['tokenizer_module']:.4f} (LoRA r={ranks['tokenizer_module']} +"
            f" {bpb['added_tokens']} new rows, {counts['tokenizer_module']:,} trainable), LoRA only"
            f" {bpb['heldout_bits_per_byte']['lora_only']:.4f} (r={ranks['lora_only']}, {counts['lora_only']:,} trainable)",
            markup=False,
            highlight=False,
        )
    console.print("top added: " + ", ".join(repr(t["token"]) for t in fig["top_added"]), markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="'small' base, 6,000 + 600 lines (about 2 minutes)")
    parser.add_argument("--no-bpb", action="store_true", help="skip the two training runs of bpb_tokenizer_vs_lora_only")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (corpus, base, extended tokenizer)")
    parser.add_argument("--write-corpus", metavar="FILE", help="write the domain corpus to FILE and stop")
    parser.add_argument("--lines", type=int, default=400, help="--write-corpus: how many lines")
    parser.add_argument("--seed", type=int, default=1, help="--write-corpus: the sentences' seed (the lexicon is fixed)")
    args = parser.parse_args(argv)
    if args.write_corpus:
        Path(args.write_corpus).write_text("\n".join(domain_corpus(args.lines, seed=args.seed)) + "\n", encoding="utf-8")
        return 0
    sizes = QUICK if args.quick else FULL
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunehub-bench-tokenizer-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run(work, sizes, bpb=not args.no_bpb)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
