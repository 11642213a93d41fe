"""Training data: the official label rule (spec §15) listed token by token, the input formats, bad data."""

import json

import pytest

from qwenlm.tokenizer import Tokenizer
from qwenlm.tools import build_react_instruction
from qwenlm.train import DataError, encode_conversation, load_training_data, parse_sample
from qwenlm.train.labels import IGNORE_TOKEN_ID

# Structural ids, written out (spec §11.3 and finetune.py's tokenization of the role strings).
IM_START, IM_END, NL = [151644], [151645], [198]
SYSTEM, USER, ASSISTANT = [8948], [872], [77091]

CONVERSATION = [("system", "You are a pirate."), ("user", "Hi there"), ("assistant", "Ahoy, matey!"),
                ("user", "Bye"), ("assistant", "Fair winds.")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file()


def official_sample(conv=CONVERSATION, id_="identity_0"):
    return {"id": id_, "conversations": [{"from": r, "value": v} for r, v in conv]}


def expand(tok, listing):
    """A listing of (ids or plain text, trained?) -> (input_ids, labels)."""
    ids, labels = [], []
    for piece, trained in listing:
        piece_ids = tok.encode(piece) if isinstance(piece, str) else piece
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_TOKEN_ID] * len(piece_ids)
    return ids, labels


def test_official_label_rule_listing(tok):
    # finetune.py preprocess: <|im_start|>, <|im_end|> and the "\n" after it are trained in every turn;
    # role names, the "\n" after them, system and user text are not; assistant content is.
    listing = [
        (IM_START, True), (SYSTEM, False), (NL, False), ("You are a pirate.", False), (IM_END, True), (NL, True),
        (IM_START, True), (USER, False), (NL, False), ("Hi there", False), (IM_END, True), (NL, True),
        (IM_START, True), (ASSISTANT, False), (NL, False), ("Ahoy, matey!", True), (IM_END, True), (NL, True),
        (IM_START, True), (USER, False), (NL, False), ("Bye", False), (IM_END, True), (NL, True),
        (IM_START, True), (ASSISTANT, False), (NL, False), ("Fair winds.", True), (IM_END, True), (NL, True),
    ]
    assert encode_conversation(tok, parse_sample(official_sample())) == expand(tok, listing)


def test_assistant_only_listing(tok):
    listing = [
        (IM_START, False), (SYSTEM, False), (NL, False), ("You are a pirate.", False), (IM_END, False), (NL, False),
        (IM_START, False), (USER, False), (NL, False), ("Hi there", False), (IM_END, False), (NL, False),
        (IM_START, False), (ASSISTANT, False), (NL, False), ("Ahoy, matey!", True), (IM_END, True), (NL, False),
        (IM_START, False), (USER, False), (NL, False), ("Bye", False), (IM_END, False), (NL, False),
        (IM_START, False), (ASSISTANT, False), (NL, False), ("Fair winds.", True), (IM_END, True), (NL, False),
    ]
    got = encode_conversation(tok, parse_sample(official_sample()), assistant_only=True)
    assert got == expand(tok, listing)


def test_official_defaults_system_and_drops_opening_assistant(tok):
    # No system message -> "You are a helpful assistant."; an opening assistant turn is dropped (finetune.py).
    conv = parse_sample(official_sample([("assistant", "stray"), ("user", "Hi"), ("assistant", "Yo")]))
    assert conv.dropped_first_turn
    assert conv.system == "You are a helpful assistant."
    assert conv.turns == [("user", "Hi"), ("assistant", "Yo")]


def test_special_text_in_data_becomes_control_tokens(tok):
    # finetune.py tokenizes with the tokenizer's default allowed_special="all".
    conv = parse_sample(official_sample([("user", "a<|im_end|>b"), ("assistant", "ok")]))
    ids, _ = encode_conversation(tok, conv)
    assert ids.count(IM_END[0]) == 4  # system, user (its own + the one in the text), assistant


def write(path, samples, jsonl=False):
    path.write_text("\n".join(json.dumps(s) for s in samples) if jsonl else json.dumps(samples), encoding="utf-8")
    return path


def test_three_formats_give_identical_tokens(tok, tmp_path):
    messages = {"messages": [{"role": r, "content": v} for r, v in CONVERSATION]}
    a = write(tmp_path / "a.json", [official_sample()])
    b = write(tmp_path / "b.jsonl", [official_sample()], jsonl=True)
    c = write(tmp_path / "c.jsonl", [messages], jsonl=True)
    got = [load_training_data(p, tok, max_len=512)[0][0] for p in (a, b, c)]
    assert got[0].input_ids == got[1].input_ids == got[2].input_ids
    assert got[0].labels == got[1].labels == got[2].labels
    assert got[0].input_ids[:4] == IM_START + SYSTEM + NL + tok.encode("You")  # the sample's own system prompt


def test_tool_call_sample_renders_server_react_text(tok):
    weather = {"name": "get_weather", "description": "Weather of a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    sample = {"tools": [{"type": "function", "function": weather}], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "I should look it up.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "22 degrees"},
        {"role": "assistant", "content": "It is 22 degrees."},
    ]}
    conv = parse_sample(sample)
    # The official openai_api.py writing (spec §13): the ReAct instruction before the question, the call as
    # Thought/Action/Action Input, the result as Observation, the answer as Final Answer.
    assert conv.turns == [
        ("user", build_react_instruction([weather]) + "\n\nQuestion: Weather in Paris?"),
        ("assistant", 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
                      "Observation: 22 degrees\nThought: I now know the final answer.\nFinal Answer: It is 22 degrees."),
    ]
    assert build_react_instruction([weather]).startswith("Answer the following questions as best you can.")
    assert "get_weather: Call this tool to interact with the get_weather API." in conv.turns[0][1]


BAD_SAMPLES = [
    ({"id": "x"}, None, "'conversations'"),
    ({"conversations": "hi"}, "conversations", "list"),
    ({"conversations": []}, "conversations", "no user or assistant turn"),
    ({"conversations": [{"from": "system", "value": "s"}]}, "conversations", "no user or assistant turn"),
    ({"conversations": [{"value": "hi"}]}, "conversations[0].from", "missing"),
    ({"conversations": [{"from": "user"}]}, "conversations[0].value", "missing"),
    ({"conversations": [{"from": "user", "value": 3}]}, "conversations[0].value", "string"),
    ({"conversations": [{"from": "gpt", "value": "hi"}]}, "conversations[0].from", "unknown role"),
    ({"conversations": [{"from": "user", "value": "a"}, {"from": "system", "value": "s"}]},
     "conversations[1].from", "only allowed first"),
    ({"conversations": ["hi"]}, "conversations[0]", "object"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]", "invalid role"),
    ({"messages": [{"content": "x"}]}, "messages[0]", "no 'role'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0]", "must follow a user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "r"}]},
     "messages[2].role", "cannot end with a tool result"),
]


@pytest.mark.parametrize("bad,field,words", BAD_SAMPLES)
def test_bad_sample_names_file_index_and_field(tok, tmp_path, bad, field, words):
    path = write(tmp_path / "d.jsonl", [official_sample(), bad], jsonl=True)
    with pytest.raises(DataError) as e:
        load_training_data(path, tok, max_len=512)
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 1, field)
    assert words in str(e.value) and str(path) in str(e.value) and "sample 1" in str(e.value)


def test_bad_json(tok, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": []},\n {"conversations": [}]')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 2"):
        load_training_data(broken, tok, max_len=512)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(official_sample()) + "\n\n{nope\n")
    with pytest.raises(DataError, match=r"broken.jsonl: sample 1: invalid JSON on line 3") as e:
        load_training_data(lines, tok, max_len=512)
    assert e.value.index == 1
    scalar = write(tmp_path / "scalar.json", [official_sample(), 7])
    with pytest.raises(DataError, match=r"sample 1: a sample must be a JSON object"):
        load_training_data(scalar, tok, max_len=512)


def test_long_samples_error_skip_or_truncate(tok, tmp_path):
    short = official_sample([("user", "Hi"), ("assistant", "Yo")])
    long = official_sample([("user", "word " * 300), ("assistant", "ok")])
    path = write(tmp_path / "d.json", [short, long, short])
    n_short = len(load_training_data(path, tok, max_len=4096)[0][0].input_ids)
    with pytest.raises(DataError, match=r"d.json: sample 1: \d+ tokens, over max_len=100"):
        load_training_data(path, tok, max_len=100)
    samples, report = load_training_data(path, tok, max_len=100, on_long="skip")
    assert [s.index for s in samples] == [0, 2] and report.skipped_long == 1 and report.truncated == 0
    assert report.samples == 2 and report.tokens == 2 * n_short
    samples, report = load_training_data(path, tok, max_len=100, on_long="truncate")
    full = load_training_data(path, tok, max_len=4096)[0][1]
    assert report.truncated == 1 and report.skipped_long == 0
    assert samples[1].input_ids == full.input_ids[:100] and samples[1].labels == full.labels[:100]  # official cut


def test_report_counts_trained_tokens(tok, tmp_path):
    path = write(tmp_path / "d.json", [official_sample(), official_sample([("assistant", "x"), ("user", "u")])])
    samples, report = load_training_data(path, tok, max_len=512)
    assert report.samples == 2 and report.dropped_first_turn == 1
    assert report.tokens == sum(len(s.input_ids) for s in samples)
    # Listing above: 5 turns x 3 structural + "Ahoy, matey!" + "Fair winds."; the second sample: 2 turns x 3.
    # The first <|im_start|> of each sample is never a loss target (nothing precedes it): one less each.
    trained = 15 + len(tok.encode("Ahoy, matey!")) + len(tok.encode("Fair winds.")) + 6 - 2
    assert report.trained_tokens == trained
    assert report.trained_share == pytest.approx(trained / report.tokens)
    assert "2 samples" in report.summary()
