"""ReAct function calling: the tool prompt (spec §13 verbatim), messages -> turns, reply parsing."""

import pytest

from qwenlm.tools import (
    DEFAULT_SYSTEM,
    MessagesError,
    ReactStreamParser,
    build_react_instruction,
    functions_from_tools,
    messages_to_turns,
    parse_react_reply,
    reply_prefix,
)

WEATHER = {"name": "get_weather", "description": "Get the weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

# Spelled out by hand from spec §13 (TOOL_DESC and REACT_INSTRUCTION of the official openai_api.py).
EXPECTED_INSTRUCTION = (
    "Answer the following questions as best you can. You have access to the following APIs:\n\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    "Get the weather of a city. Parameters: "
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}\n\n'
    "search: Call this tool to interact with the Web Search API. What is the Web Search API useful for? "
    'Search the web. Parameters: {"q": "查询"}\n\n'
    "Use the following format:\n\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather, search]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n\n"
    "Begin!"
)
QWEN_STYLE = {"name_for_model": "search", "name_for_human": "Web Search", "description_for_model": "Search the web.",
              "parameters": {"q": "查询"}}


def test_instruction_matches_official_template():
    assert build_react_instruction([WEATHER, QWEN_STYLE]) == EXPECTED_INSTRUCTION


def test_tools_and_functions_normalise_to_the_same_functions():
    assert functions_from_tools([{"type": "function", "function": WEATHER}], None) == [WEATHER]
    assert functions_from_tools(None, [WEATHER]) == [WEATHER]
    with pytest.raises(MessagesError):
        functions_from_tools([{"type": "retrieval"}], None)
    with pytest.raises(MessagesError):
        functions_from_tools(None, [{"description": "no name"}])


def test_plain_chat_turns():
    turns = messages_to_turns([
        {"role": "system", "content": "\nBe brief.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
    ])
    assert turns.system == "Be brief."  # official: lstrip("\n").rstrip()
    assert turns.history == [("Hi", "Hello!")]
    assert turns.query == "How are you?"
    assert turns.continuation is None
    assert messages_to_turns([{"role": "user", "content": "x"}]).system == DEFAULT_SYSTEM


def test_instruction_goes_to_query_without_history_and_to_last_history_turn_otherwise():
    first = messages_to_turns([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    assert first.query == build_react_instruction([WEATHER]) + "\n\nQuestion: Weather in Paris?"
    later = messages_to_turns([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}], [WEATHER])
    assert later.history == [(build_react_instruction([WEATHER]) + "\n\nQuestion: a",
                              "Thought: I now know the final answer.\nFinal Answer: b")]
    assert later.query == "c"


def test_tool_result_continues_the_assistant_turn():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = messages_to_turns([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "I should look it up.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ], [WEATHER])
    assert turns.query.endswith("\n\nQuestion: Weather in Paris?")
    assert turns.history == []
    assert turns.continuation == ('Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}'
                                  "\nObservation: sunny, 21C\nThought:")
    legacy = messages_to_turns([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "rain"},
    ], [WEATHER])
    assert legacy.continuation == "Thought: \nAction: get_weather\nAction Input: {}\nObservation: rain\nThought:"


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty"),
    ([{"content": "x"}], "no 'role'"),
    ([{"role": "wizard", "content": "x"}], "invalid role"),
    ([{"role": "system", "content": "x"}], "at least one user"),
    ([{"role": "assistant", "content": "x"}], "must follow a user"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], "must follow an assistant"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "only allowed first"),
    ([{"role": "user", "content": 5}], "content must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text"),
])
def test_bad_messages(messages, fragment):
    with pytest.raises(MessagesError, match=fragment):
        messages_to_turns(messages)


@pytest.mark.parametrize("text, content, name, arguments", [
    # official parse_response cases (spec §13)
    ('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:',
     "I need the weather.", "get_weather", '{"city": "Paris"}'),
    ('Thought: x\nAction: get_weather\nAction Input: {"city": "Paris"}\n',  # stop string swallowed
     "x", "get_weather", '{"city": "Paris"}'),
    ("Action: search\nAction Input: {}", "", "search", "{}"),
    ("Thought: I now know the final answer\nFinal Answer: It is sunny.", "It is sunny.", None, None),
    ("Just a plain reply.", "Just a plain reply.", None, None),
    ("Thought: hmm\nAction: \nAction Input: {}", "Thought: hmm\nAction: \nAction Input: {}", None, None),
    ("Final Answer: a\nFinal Answer: b", "b", None, None),  # the LAST Final Answer wins
])
def test_parse_react_reply(text, content, name, arguments):
    parsed = parse_react_reply(text)
    assert (parsed.content, parsed.name, parsed.arguments) == (content, name, arguments)


@pytest.mark.parametrize("text", [
    'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n',
    "Thought: I now know the final answer\nFinal Answer: It is **sunny**.",
    "Just a plain reply.",
    "Final Answer:   spaced",
    "Thought: still thinking",
])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_stream_parser_agrees_with_whole_reply_parser(text, step):
    parser = ReactStreamParser()
    streamed = "".join(parser.feed(text[i:i + step]) for i in range(0, len(text), step))
    tail = parser.finish()
    whole = parse_react_reply(text)
    assert (streamed + tail.content).strip() == whole.content
    assert (tail.name, tail.arguments) == (whole.name, whole.arguments)
    if whole.name:
        assert streamed == ""  # a call's Thought is never streamed before the call is known


@pytest.mark.parametrize("text", [
    " I now know the final answer\nFinal Answer: It is sunny.",
    ' I need Berlin too.\nAction: get_weather\nAction Input: {"city": "Berlin"}\n',
    " still thinking",
])
@pytest.mark.parametrize("step", [1, 1000])
def test_stream_parser_after_a_tool_result(text, step):
    # The prompt ends "Observation: ...\nThought:", so a real reply opens mid-Thought, without a marker.
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny"}]
    assert messages_to_turns(messages, [WEATHER]).continuation.endswith("\nObservation: sunny\nThought:")
    parser = ReactStreamParser(reply_prefix(messages))
    streamed = "".join(parser.feed(text[i:i + step]) for i in range(0, len(text), step))
    tail, whole = parser.finish(), parse_react_reply(text)
    assert (streamed + tail.content).strip() == whole.content and (tail.name, tail.arguments) == (
        whole.name, whole.arguments)
    assert "Final Answer" not in streamed and "Action" not in streamed
    assert reply_prefix(messages[:1]) == ""


def test_stream_parser_streams_the_answer_before_the_end():
    parser = ReactStreamParser()
    assert parser.feed("Thought: I now know the final answer\nFinal") == ""
    assert parser.feed(" Answer: Hel") == "Hel"
    assert parser.feed("lo") == "lo"


CALL_TEXT = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'


@pytest.mark.parametrize("style, finish", [("tools", "tool_calls"), ("functions", "function_call")])
def test_reply_shapes_parse_with_the_openai_client_types(style, finish):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from qwenlm.server.handlers import react_final_deltas, react_message

    message, reason = react_message(CALL_TEXT, style, "stop")
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}]}
    parsed = ChatCompletion.model_validate(body).choices[0]
    assert parsed.finish_reason == finish and parsed.message.content == "I need the weather."
    call = parsed.message.tool_calls[0].function if style == "tools" else parsed.message.function_call
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')

    stream = ReactStreamParser()
    assert stream.feed(CALL_TEXT) == ""
    deltas, reason = react_final_deltas(stream.finish(), style, "stop")
    chunks = [ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                                  "model": "m", "choices": [{"index": 0, "delta": d}]})
              for d in deltas]
    assert reason == finish and chunks[0].choices[0].delta.content == "I need the weather."
    delta = chunks[1].choices[0].delta
    call = delta.tool_calls[0].function if style == "tools" else delta.function_call
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')

    plain, reason = react_message("Thought: done\nFinal Answer: 42", style, "stop")
    assert plain == {"role": "assistant", "content": "42"} and reason == "stop"
