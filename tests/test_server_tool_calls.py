"""Function calling end to end with a model that writes a real ReAct call.

The random tiny model never writes "Action: ...", so here its lm_head is replaced by a script: each time
the engine asks for logits, the next token of a fixed reply gets all the probability. Everything else is
the product — engine, stop strings ("Observation:"), detokenizer, server, ReAct parser, openai client.
"""

import json

import openai
import pytest

from engine_helpers import ScriptedHead
from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread

WEATHER = {"name": "get_weather", "description": "Get the weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = 'Thought: I should look up the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: rain'
ANSWER = "Thought: I now know the final answer\nFinal Answer: It is sunny in Paris."


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    llm = LLM(tiny_ckpt, device="cpu")
    head = ScriptedHead(llm.tokenizer, llm.model.config.vocab_size)
    llm.model.logits = head
    engine = AsyncEngine(llm)
    with ServerThread(create_app(engine, llm.tokenizer, "qwen")) as srv:
        srv.head = head
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        yield srv
    engine.shutdown()


def test_tool_call_non_stream(served):
    served.head.say(CALL)
    r = served.client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                              tools=[{"type": "function", "function": WEATHER}], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "rain" not in (choice.message.content or "")  # generation stopped at "Observation:"


def test_tool_call_stream(served):
    served.head.say(CALL)
    stream = served.client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"type": "function", "function": WEATHER}], temperature=0, stream=True)
    name, args, reasons, content = "", "", [], ""
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"] and name == "get_weather" and json.loads(args) == {"city": "Paris"}
    assert "Action" not in content and "rain" not in content


def test_legacy_function_call(served):
    served.head.say(CALL)
    r = served.client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Weather?"}],
                                              functions=[WEATHER], temperature=0)
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"
    assert json.loads(r.choices[0].message.function_call.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip_with_tool_result(served, stream):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    served.head.say(ANSWER)
    kwargs = dict(model="qwen", messages=messages, tools=[{"type": "function", "function": WEATHER}], temperature=0)
    if stream:
        text, reasons = "", []
        for chunk in served.client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
        assert reasons == ["stop"]
    else:
        r = served.client.chat.completions.create(**kwargs)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert text == "It is sunny in Paris."
