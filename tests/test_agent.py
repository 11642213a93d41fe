"""The ReAct agent end to end with a model that writes real ReAct replies.

As in test_server_tool_calls.py, the tiny model's lm_head is replaced by a script: each generation emits
the next scripted reply token by token. The engine, the "Observation:" stop string, the detokenizer, the
prompt and the parser are the product's.
"""

import pytest

import qwenlm
from engine_helpers import ScriptedHead
from qwenlm.agent import Agent, AgentResult, Step, parse_arguments, tool

WEATHER = {"name": "get_weather", "description": "Get the weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    llm = qwenlm.load(str(tiny_ckpt), device="cpu", progress=False)
    llm.model.logits = ScriptedHead(llm.tokenizer, llm.model.config.vocab_size)
    return llm


def scripted(agent: Agent, replies: list[str]) -> list[str]:
    """Make each generation of `agent` emit the next reply; returns the list the prompts are logged to."""
    prompts, replies, generate = [], list(replies), agent._generate

    def run(ids):
        prompts.append(agent.llm.tokenizer.decode(ids))
        agent.llm.model.logits.say(replies.pop(0))
        return generate(ids)

    agent._generate = run
    return prompts


def call(name: str, args: str) -> str:
    # The text after "Action Input" shows that generation stopped at "Observation:".
    return f"Thought: I should use {name}.\nAction: {name}\nAction Input: {args}\nObservation: made up"


FINAL = " I now know the final answer\nFinal Answer: "


def test_tool_called_and_result_fed_back(llm):
    seen = []

    @tool(parameters=WEATHER["parameters"])
    def get_weather(city):
        """Get the weather of a city."""
        seen.append(city)
        return {"city": city, "sky": "sunny"}

    agent = Agent(llm, tools=[get_weather], temperature=0)
    prompts = scripted(agent, [call("get_weather", '{"city": "Paris"}'), FINAL + "Sunny in Paris."])
    events = list(agent.stream("Weather in Paris?"))
    assert seen == ["Paris"]
    step, result = events
    assert step == Step("I should use get_weather.", "get_weather", '{"city": "Paris"}',
                        '{"city": "Paris", "sky": "sunny"}')
    assert isinstance(result, AgentResult) and result.finished and result.answer == "Sunny in Paris."
    assert result.steps == [step] and result.history == [("Weather in Paris?", "Sunny in Paris.")]
    # The first prompt is the server's ReAct instruction; the second continues the turn after the result.
    assert "get_weather: Call this tool to interact with the get_weather API." in prompts[0]
    assert "Question: Weather in Paris?" in prompts[0] and "made up" not in prompts[1]
    assert prompts[1].endswith('Action Input: {"city": "Paris"}\n'
                               'Observation: {"city": "Paris", "sky": "sunny"}\nThought:')


def test_tool_error_is_an_observation(llm):
    def divide(a, b):
        return a / b

    spec = {"type": "function", "function": {"name": "divide", "description": "a / b", "parameters": {}}}
    agent = Agent(llm, tools=[(spec, divide)], temperature=0)
    prompts = scripted(agent, [call("divide", '{"a": 1, "b": 0}'), call("divide", '{"a": 6, "b": 3}'),
                               FINAL + "2"])
    result = agent.run("6 / 3?")
    assert [s.observation for s in result.steps] == ["Error: ZeroDivisionError: division by zero", "2.0"]
    assert "Observation: Error: ZeroDivisionError: division by zero\nThought:" in prompts[1]
    assert result.finished and result.answer == "2"


def test_unknown_tool_is_an_observation(llm):
    qwen_style = {"name_for_model": "search", "name_for_human": "Search", "description_for_model": "Web search.",
                  "parameters": [{"name": "q", "type": "string", "required": True}]}
    agent = Agent(llm, tools=[(qwen_style, lambda q: f"results for {q}")], temperature=0)
    prompts = scripted(agent, [call("browse", '{"url": "x"}'), call("search", '{"q": "qwen"}'), FINAL + "done"])
    result = agent.run("Find qwen")
    assert result.steps[0].observation == "Error: there is no tool named 'browse'; the tools are: search."
    assert result.steps[1].observation == "results for qwen"
    assert "search: Call this tool to interact with the Search API. What is the Search API useful for? " \
           "Web search." in prompts[0]
    assert result.answer == "done"


def test_step_limit_ends_the_run(llm):
    calls = []
    agent = Agent(llm, tools=[(WEATHER, lambda city: calls.append(city) or "rain")], max_steps=2, temperature=0)
    prompts = scripted(agent, [call("get_weather", '{"city": "Oslo"}')] * 3)
    result = agent.run("Weather?")
    assert calls == ["Oslo", "Oslo"] and len(prompts) == 2 and len(result.steps) == 2
    assert not result.finished and "step limit (2)" in result.answer


def test_malformed_action_input_is_read_tolerantly(llm):
    got = []
    agent = Agent(llm, tools=[(WEATHER, lambda city, unit="C": got.append((city, unit)) or "ok")], temperature=0)
    scripted(agent, [call("get_weather", "{'city': 'Rome', 'unit': 'F',}"), call("get_weather", "{city: "),
                     FINAL + "ok"])
    result = agent.run("Weather in Rome?")
    assert got == [("Rome", "F")]
    assert result.steps[1].observation.startswith("Error: the Action Input is not valid JSON")
    assert result.answer == "ok"


def test_plain_reply_is_the_answer_and_history_is_used(llm):
    agent = Agent(llm, tools=[(WEATHER, lambda city: "rain")], temperature=0)
    prompts = scripted(agent, ["Hello there."])
    result = agent.run("Hi", history=[("Weather?", "It rains.")])
    assert result.answer == "Hello there." and result.steps == []
    # The instruction goes into the last history turn, and past answers are written as Final Answers.
    assert "Question: Weather?" in prompts[0] and "Final Answer: It rains." in prompts[0]


def test_parse_arguments_and_bad_tools():
    assert parse_arguments("") == {} and parse_arguments('{"a": [1, 2,],}') == {"a": [1, 2]}
    with pytest.raises(ValueError):
        parse_arguments("{a: ")
    with pytest.raises(TypeError):
        Agent(None, tools=["not a tool"])
