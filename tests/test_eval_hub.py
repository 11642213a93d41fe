"""`--data` as a `datasets` hub name. No network: each hub dataset is rebuilt as a local dataset folder (parquet
files with the hub's fields and features, one config per subject) from the same questions that
eval_fixtures writes in the official file layouts, and the real `datasets.load_dataset` reads it in place
of the hub; the items must equal those read from the official files."""
import json
from argparse import Namespace

import datasets
import huggingface_hub
import pytest
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from eval_fixtures import (CEVAL_ROWS, CMMLU_ROWS, GSM8K_ROWS, HUMANEVAL_TASKS, MMLU_ROWS, write_ceval,
                           write_cmmlu, write_jsonl, write_mmlu)
from qwenlm import cli
from qwenlm.eval import data, hub
from qwenlm.eval.data import LETTERS, EvalDataError
from qwenlm.eval.run import load_items

REAL_LOAD = datasets.load_dataset
_MMLU = Features(question=Value("string"), subject=Value("string"), choices=Sequence(Value("string")),
                 answer=ClassLabel(names=list(LETTERS)))
_CEVAL = Features(id=Value("int32"), **{k: Value("string") for k in
                                        ("question", "A", "B", "C", "D", "answer", "explanation")})


def _repo(root, configs: dict) -> str:
    """A dataset folder in the hub's layout: {config: {split: Dataset}}, configs declared in README.md."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, ds in splits.items():
            ds.to_parquet(root / config / f"{split}.parquet")
            card += [f"  - split: {split}", f"    path: {config}/{split}.parquet"]
    (root / "README.md").write_text("\n".join(card + ["---", ""]))
    return str(root)


def _mmlu(subject, rows):
    return Dataset.from_dict(dict(question=[r[0] for r in rows], subject=[subject] * len(rows),
                                  choices=[r[1:5] for r in rows], answer=[LETTERS.index(r[5]) for r in rows]),
                             features=_MMLU)


def _ceval(rows):
    rows = [r + [""] * (8 - len(r)) for r in rows]  # the hub's val and test splits carry an empty explanation
    return Dataset.from_dict({k: [int(r[0]) if k == "id" else r[i] for r in rows] for i, k in enumerate(_CEVAL)},
                             features=_CEVAL)


def _cmmlu(rows):
    return Dataset.from_dict({k: [r[i + 1] for r in rows] for i, k in enumerate(("Question", "A", "B", "C", "D",
                                                                                   "Answer"))})


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for name in ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval"):
        (root / name).mkdir()
    ceval_test = [["0", "无答案题", "a", "b", "c", "d", ""]]
    return {
        "cais/mmlu": _repo(root / "mmlu", {s: {"dev": _mmlu(s, dev), "test": _mmlu(s, test)}
                                           for s, (dev, test) in MMLU_ROWS.items()}),
        "ceval/ceval-exam": _repo(root / "ceval", {s: {"dev": _ceval(dev), "val": _ceval(val),
                                                       "test": _ceval(ceval_test)}
                                                   for s, (dev, val) in CEVAL_ROWS.items()}),
        "haonan-li/cmmlu": _repo(root / "cmmlu", {s: {"dev": _cmmlu(dev), "test": _cmmlu(test)}
                                                  for s, (dev, test) in CMMLU_ROWS.items()}),
        "openai/gsm8k": _repo(root / "gsm8k", {"main": {"train": Dataset.from_list(GSM8K_ROWS[:1]),
                                                        "test": Dataset.from_list(GSM8K_ROWS)}}),
        "openai/openai_humaneval": _repo(root / "humaneval", {"openai_humaneval": {
            "test": Dataset.from_list(HUMANEVAL_TASKS)}}),
    }


@pytest.fixture()
def fake_hub(repos, monkeypatch, tmp_path):
    """`datasets.load_dataset` reading the local folder of each hub name; the names asked are recorded."""
    asked = []

    def load(name, config=None, split=None, **kw):
        asked.append((name, config, split))
        return REAL_LOAD(repos[name], config, split=split, cache_dir=str(tmp_path / "cache"), **kw)
    monkeypatch.setattr(datasets, "load_dataset", load)
    return asked


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return dict(mmlu=write_mmlu(root / "mmlu"), ceval=write_ceval(root / "ceval"), cmmlu=write_cmmlu(root / "cmmlu"),
                gsm8k=write_jsonl(root / "test.jsonl", GSM8K_ROWS),
                humaneval=write_jsonl(root / "HumanEval.jsonl", HUMANEVAL_TASKS))


@pytest.mark.parametrize("benchmark,name,splits,rows", [
    ("mmlu", "cais/mmlu", ("dev", "test"), MMLU_ROWS), ("ceval", "ceval/ceval-exam", ("dev", "val"), CEVAL_ROWS),
    ("cmmlu", "haonan-li/cmmlu", ("dev", "test"), CMMLU_ROWS)])
def test_choice_items_from_the_hub_equal_the_official_files(fake_hub, files, benchmark, name, splits, rows):
    subjects = list(rows)
    for split in splits:
        from_hub = hub.load_choice_benchmark(benchmark, name, split, subjects)
        from_files = data.load_choice_benchmark(benchmark, files[benchmark], split, subjects)
        assert from_hub == from_files  # subject, row, question, choices, answer letter, order
        assert list(from_hub) == subjects and sum(map(len, from_hub.values())) > len(subjects)
    assert set(fake_hub) == {(name, s, split) for s in subjects for split in splits}
    # the letters are the fixture's, not only equal between the two readers
    first = subjects[0]
    assert [it.answer for it in from_hub[first]] == [r[-1] if benchmark == "mmlu" else r[6] for r in rows[first][1]]


def test_ceval_test_split_has_no_answers(fake_hub):
    items = hub.load_choice_benchmark("ceval", "ceval/ceval-exam", "test", ["computer_network"])
    assert [(it.question, it.answer) for it in items["computer_network"]] == [("无答案题", None)]


def test_gsm8k_and_humaneval_from_the_hub_equal_the_files(fake_hub, files):
    assert hub.read_gsm8k("openai/gsm8k") == data.read_gsm8k(files["gsm8k"])
    assert hub.read_humaneval("openai/openai_humaneval") == data.read_humaneval(files["humaneval"])
    assert fake_hub == [("openai/gsm8k", "main", "test"), ("openai/openai_humaneval", None, "test")]


@pytest.mark.parametrize("benchmark,alias,expected", [
    ("mmlu", "mmlu", "cais/mmlu"), ("ceval", "ceval-exam", "ceval/ceval-exam"), ("cmmlu", "cmmlu", "haonan-li/cmmlu"),
    ("gsm8k", "gsm8k", "openai/gsm8k"), ("humaneval", "openai_humaneval", "openai/openai_humaneval")])
def test_short_names_resolve_through_load_items(fake_hub, benchmark, alias, expected):
    subjects = ",".join(dict(mmlu=MMLU_ROWS, ceval=CEVAL_ROWS, cmmlu=CMMLU_ROWS).get(benchmark, {})) or None
    args = Namespace(benchmark=benchmark, data=alias, subjects=subjects, chat=True, limit=1)
    items, dev = load_items(args)
    assert items and dev == {} and {name for name, _, _ in fake_hub} == {expected}
    assert hub.hub_name("mmlu", "gsm8k") is None and hub.hub_name("plugin", "mmlu") is None


def test_hub_errors_name_data_subject_row_and_cure(fake_hub, monkeypatch, tmp_path, capsys):
    with pytest.raises(EvalDataError, match=r"--data cais/mmlu: subject 'virology' is not in the hub dataset"):
        hub.load_choice_benchmark("mmlu", "cais/mmlu", "test", ["virology"])
    # a name of another benchmark: refused before any model loads, the accepted names listed
    assert cli.main(["eval", "gsm8k", "--model", "x", "--data", "cais/mmlu", "--chat"]) == 2
    assert capsys.readouterr().err == ("qwenlm: error: --data cais/mmlu: no such file or folder, nor a `datasets` "
                                       "hub name of gsm8k (accepted: openai/gsm8k, gsm8k)\n")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: Dataset.from_dict(
        dict(question=["q"], subject=["s"], choices=[["1", "2", "3"]], answer=[0])))
    with pytest.raises(EvalDataError, match=r"cais/mmlu \(anatomy, dev\): row 1: field 'choices' is .*expected 4"):
        hub.load_choice_benchmark("mmlu", "cais/mmlu", "dev", ["anatomy"])
    # no network: the real datasets error, wrapped with what to do instead
    # (empty caches: a copy cached on this machine must not answer)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: REAL_LOAD(*a, cache_dir=str(tmp_path / "e"), **kw))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "h"))
    with pytest.raises(EvalDataError, match=r"--data openai/gsm8k \(main, test\): cannot read the hub dataset "
                                            r"\(ConnectionError: .*download the official files"):
        hub.read_gsm8k("openai/gsm8k")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # not installed
    with pytest.raises(EvalDataError, match=r"needs the `datasets` package \(pip install 'qwenlm\[eval-hub\]'\)"):
        hub.read_humaneval("openai/openai_humaneval")


def test_mmlu_from_the_hub_end_to_end_equals_the_files_run(tiny_ckpt, fake_hub, files, tmp_path):
    def run(data, out):
        assert cli.main(["eval", "mmlu", "--model", str(tiny_ckpt), "--device", "cpu", "--data", data, "--limit",
                         "2", "--subjects", ",".join(MMLU_ROWS), "--out", str(tmp_path / out)]) == 0
        folder = tmp_path / out / "mmlu-base"
        return ([json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()],
                json.loads((folder / "summary.json").read_text()))
    hub_items, hub_summary = run("cais/mmlu", "hub")
    file_items, file_summary = run(str(files["mmlu"]), "files")
    assert [(r["key"], r["answer"]) for r in hub_items] == [
        (f"{s}/{n}", MMLU_ROWS[s][1][n - 1][5]) for s in MMLU_ROWS for n in (1, 2)]
    assert hub_items == file_items and hub_summary == file_summary and hub_summary["count"] == 4
