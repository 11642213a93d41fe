"""How long does the whole MMLU 5-shot take: `qwenlm eval mmlu` beside the official script's method, same GPU.

Data: synthetic questions in MMLU's layout (`dev/<subject>_dev.csv`, `test/<subject>_test.csv`, no header) with the
real counts: the 57 subjects of qwenlm.eval.subjects, each with its real test-split size (14,042 questions in all)
and 5 dev rows for the 5-shot prefix. The text is drawn from single-token English words, so the prompts have
about the length of real MMLU prompts on average (the mean is printed; real subjects differ more from each other:
professional_law's prompts are far longer than most). Weights: random, at the Qwen-7B shape, bf16, written once as
an official-layout folder under --workdir.

  qwenlm     the user's command, `qwenlm eval mmlu --model FOLDER --data DIR` (parsed and run by qwenlm.cli's own
             functions in a fresh process): the model load and the scoring timed apart, and their sum
  official   evaluate_mmlu.py's method: transformers' Qwen2ForCausalLM (SDPA, bf16) on the same weights, one
             question per forward (the 5-shot prompt, cut to its last 2,047 tokens past 2,048), softmax of the last
             position, the four " A".." D" ids, argmax. Timed on a sample (--official-per-subject questions of each
             subject) and extrapolated to the 14,042 questions: the output says so. The sample's predictions are
             compared with qwenlm's for the same questions.

Target (printed): the whole MMLU 5-shot in <= 2 minutes on one H100, and >= 10x faster than the official method.

    python bench/bench_eval.py             # H100: the folder (~15 GB) written once, then a few minutes
    python bench/bench_eval.py --tiny      # a tiny model and 3 subjects on the CPU: checks the script end to end
    python bench/bench_eval.py --only qwenlm   # parts: qwenlm, official
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from pathlib import Path

import torch

from benchlib import checkpoint, isolated, log, print_table, results_path, selected, start, write_json
from hf_baseline import load_qwen2

# MMLU's test split, questions per subject (hendrycks data.tar; they sum to 14,042).
MMLU_TEST_SIZES = {
    "abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "business_ethics": 100, "clinical_knowledge": 265,
    "college_biology": 144, "college_chemistry": 100, "college_computer_science": 100, "college_mathematics": 100,
    "college_medicine": 173, "college_physics": 102, "computer_security": 100, "conceptual_physics": 235,
    "econometrics": 114, "electrical_engineering": 145, "elementary_mathematics": 378, "formal_logic": 126,
    "global_facts": 100, "high_school_biology": 310, "high_school_chemistry": 203,
    "high_school_computer_science": 100, "high_school_european_history": 165, "high_school_geography": 198,
    "high_school_government_and_politics": 193, "high_school_macroeconomics": 390, "high_school_mathematics": 270,
    "high_school_microeconomics": 238, "high_school_physics": 151, "high_school_psychology": 545,
    "high_school_statistics": 216, "high_school_us_history": 204, "high_school_world_history": 237,
    "human_aging": 223, "human_sexuality": 131, "international_law": 121, "jurisprudence": 108,
    "logical_fallacies": 163, "machine_learning": 112, "management": 103, "marketing": 234, "medical_genetics": 100,
    "miscellaneous": 783, "moral_disputes": 346, "moral_scenarios": 895, "nutrition": 306, "philosophy": 311,
    "prehistory": 324, "professional_accounting": 282, "professional_law": 1534, "professional_medicine": 272,
    "professional_psychology": 612, "public_relations": 110, "security_studies": 245, "sociology": 201,
    "us_foreign_policy": 100, "virology": 166, "world_religions": 171,
}
TOTAL = 14042
TARGET_MINUTES, TARGET_RATIO = 2.0, 10.0
SIZES = dict(subjects=None, per_subject=None, official_per_subject=6, question_words=(15, 120), choice_words=(2, 10))
TINY_SIZES = dict(subjects=3, per_subject=4, official_per_subject=2, question_words=(5, 20), choice_words=(1, 3))


def write_mmlu(root: Path, sizes: dict, seed: int = 0) -> dict[str, int]:
    """Synthetic MMLU files under root; returns {subject: test questions}."""
    from qwenlm.tokenizer import Tokenizer
    tok = Tokenizer.from_file()
    # single-token words (" the", " water", ...): text of a known length in tokens
    words = sorted({b[1:].decode() for b in tok.token_bytes[:100_000]
                    if len(b) > 3 and b[:1] == b" " and b[1:].isalpha() and b[1:].islower() and b.isascii()})
    rng = random.Random(seed)

    def text(bounds):
        return " ".join(rng.choice(words) for _ in range(rng.randint(*bounds)))

    from qwenlm.eval.subjects import SUBJECTS
    assert set(MMLU_TEST_SIZES) == set(SUBJECTS["mmlu"]) and sum(MMLU_TEST_SIZES.values()) == TOTAL
    subjects = SUBJECTS["mmlu"][:sizes["subjects"]]
    counts = {s: sizes["per_subject"] or MMLU_TEST_SIZES[s] for s in subjects}
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for s in subjects:
        for split, n in (("dev", 5), ("test", counts[s])):
            rows = [[text(sizes["question_words"]) + "?"] + [text(sizes["choice_words"]) for _ in range(4)]
                    + [rng.choice("ABCD")] for _ in range(n)]
            with open(root / split / f"{s}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return counts


def qwenlm_part(folder: str, data: str, out: str, subjects: list[str], device: str) -> dict:
    """`qwenlm eval mmlu --model FOLDER --data DIR`: qwenlm.cli's parser, checks, loader and eval driver, as the
    command runs them, with the load and the scoring timed apart."""
    from qwenlm import cli
    from qwenlm.eval.run import run
    from qwenlm.eval.subjects import SUBJECTS
    argv = ["eval", "mmlu", "--model", folder, "--data", data, "--out", out, "--device", device]
    if set(subjects) != set(SUBJECTS["mmlu"]):  # --tiny: a few subjects; the full run is the plain command
        argv += ["--subjects", ",".join(subjects)]
    args = cli.build_parser().parse_args(argv)
    cli.check_args(args)
    t = time.perf_counter()
    llm = cli._load(args)
    load_s = time.perf_counter() - t
    log(f"qwenlm: loaded in {load_s:.1f} s")
    t = time.perf_counter()
    summary = run(args, lambda: llm)
    if device == "cuda":
        torch.cuda.synchronize()
    score_s = time.perf_counter() - t
    preds = {}
    for line in (Path(out) / "mmlu-base" / "items.jsonl").read_text().splitlines():
        r = json.loads(line)
        preds[r["key"]] = r["pred"]
    return {"load_s": load_s, "score_s": score_s, "wall_s": load_s + score_s, "items": summary["count"],
            "accuracy": summary["overall"], "preds": preds,
            "command": "qwenlm " + " ".join(argv)}


def official_part(folder: str, data: str, subjects: list[str], per_subject: int, device: str) -> dict:
    """evaluate_mmlu.py's loop on the first `per_subject` test questions of each subject: one forward each."""
    from qwenlm.eval.choice import letter_ids
    from qwenlm.eval.data import load_choice_benchmark
    from qwenlm.eval.model_logprobs import truncate_left
    from qwenlm.eval.prompts import base_choice_prompt, few_shot_prefix
    from qwenlm.tokenizer import Tokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = time.perf_counter()
    model = load_qwen2(Path(folder), device, dtype)
    load_s = time.perf_counter() - t
    log(f"official method: Qwen2ForCausalLM loaded in {load_s:.1f} s")
    tok = Tokenizer.from_file()
    ids = letter_ids(tok, "mmlu")
    test = load_choice_benchmark("mmlu", data, "test", subjects)
    dev = load_choice_benchmark("mmlu", data, "dev", subjects)
    preds, lengths = {}, []

    def one(prefix, item):
        x = truncate_left(tok.encode(base_choice_prompt("mmlu", prefix, item), allowed_special="all"), 2048)
        lengths.append(len(x))
        x = torch.tensor([x], device=device)
        logits = model(x, attention_mask=torch.ones_like(x)).logits[:, -1, :]  # every position, as the script
        probs = torch.softmax(logits.float(), dim=-1).flatten()
        letters = torch.softmax(probs[ids], dim=0).cpu()  # the script's second softmax; .cpu() syncs each question
        return "ABCD"[int(letters.argmax())]

    with torch.no_grad():
        one(few_shot_prefix("mmlu", subjects[0], dev[subjects[0]]), test[subjects[0]][0])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for s in subjects:
            prefix = few_shot_prefix("mmlu", s, dev[s])
            for item in test[s][:per_subject]:
                preds[f"{s}/{item.row}"] = one(prefix, item)
        score_s = time.perf_counter() - t
    lengths = lengths[1:]
    return {"load_s": load_s, "sample_items": len(preds), "sample_s": score_s, "per_item_s": score_s / len(preds),
            "mean_prompt_tokens": sum(lengths) / len(lengths), "preds": preds}


def main() -> int:
    args, device, sizes, results, _ = start("bench_eval", __doc__, SIZES, TINY_SIZES)
    parts = selected(args, ["qwenlm", "official"])
    work = Path(args.workdir)
    shape = dict(vocab_size=151936, hidden_size=128, num_attention_heads=1, intermediate_size=256) if args.tiny else {}
    folder = checkpoint(args.workdir, "bf16", args.tiny, device, **shape)  # the tokenizer's ids need the real vocab
    data = work / ("mmlu-synthetic-tiny" if args.tiny else "mmlu-synthetic")
    shutil.rmtree(data, ignore_errors=True)
    counts = write_mmlu(data, sizes)
    subjects, total = list(counts), sum(counts.values())
    log(f"synthetic MMLU: {len(subjects)} subjects, {total} test questions, 5-shot from dev, under {data}")
    results.update(subjects=len(subjects), questions=total)
    out = work / "eval-out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing resumed from the cache
    q = o = None
    if "qwenlm" in parts:
        q = results["qwenlm"] = isolated(device, qwenlm_part, str(folder), str(data), str(out), subjects, device)
    if "official" in parts:
        o = results["official"] = isolated(device, official_part, str(folder), str(data), subjects,
                                           sizes["official_per_subject"], device)
    rows, failed = [], False
    if q and "error" not in q:
        q_preds = q.pop("preds")
        rows.append(["qwenlm eval mmlu", q["items"] / q["score_s"], f"{q['score_s'] / 60:.2f}", f"{q['wall_s'] / 60:.2f}",
                     f"load {q['load_s']:.0f} s; measured on all {q['items']} questions"])
    else:
        failed = failed or q is not None
    if o and "error" not in o:
        o_preds = o.pop("preds")
        o["extrapolated_score_s"] = o["per_item_s"] * total
        rows.append(["official method", 1 / o["per_item_s"], f"{o['extrapolated_score_s'] / 60:.2f}",
                     f"{(o['extrapolated_score_s'] + o['load_s']) / 60:.2f}",
                     f"timed on {o['sample_items']} questions ({sizes['official_per_subject']} a subject), "
                     f"extrapolated to {total}; mean prompt {o['mean_prompt_tokens']:.0f} tokens"])
        if q and "error" not in q:
            same = [k for k in o_preds if q_preds.get(k) == o_preds[k]]
            results["agreement"] = len(same) / len(o_preds)
            results["speedup_scoring"] = o["extrapolated_score_s"] / q["score_s"]
            results["speedup_wall"] = (o["extrapolated_score_s"] + o["load_s"]) / q["wall_s"]
    else:
        failed = failed or o is not None
    print_table(f"MMLU 5-shot, {total} questions ({len(subjects)} subjects), {results['header']['device']}",
                ["method", "items/s", "scoring min", "wall min (with load)", "note"], rows)
    if "speedup_scoring" in results:
        print(f"\nqwenlm vs the official method: {results['speedup_scoring']:.1f}x (scoring), "
              f"{results['speedup_wall']:.1f}x (wall, with the model load); the same letter on "
              f"{100 * results['agreement']:.1f}% of the {o['sample_items']} sampled questions")
    if q and "error" not in q:
        print(f"target: the whole MMLU 5-shot in <= {TARGET_MINUTES:.0f} min on one H100 (here "
              f"{q['wall_s'] / 60:.2f} min with the load, {q['score_s'] / 60:.2f} min scoring), and >= "
              f"{TARGET_RATIO:.0f}x the official method")
    write_json(results, results_path("bench_eval", args.json))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
