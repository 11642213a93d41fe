"""The agent frameworks people build on, against `qwenlm serve` as it is: LangChain (`langchain-openai`'s
ChatOpenAI with bind_tools) and Qwen-Agent (an Assistant with a registered tool, through the OpenAI-compatible
`model_server`).

The tiny model's lm_head is scripted per request from the prompt the server built: a prompt holding a
question writes a real ReAct call (Thought / Action / Action Input, then an "Observation:" the server must
stop at); a prompt that continues after a tool result ("...Observation: <result>\\nThought:") writes a Final
Answer quoting that result. So the tool result can only reach the final answer through the framework's
tool message, the server's ReAct prompt and the model.
"""

import json

import json5
import pytest

from engine_helpers import PromptScriptedHead
from qwenlm.engine import LLM, AsyncEngine
from qwenlm.server.api import create_app
from qwenlm.server.launch import ServerThread

CALL = ('Thought: I should look up the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        'Observation: made up by the model')
CALLS = []  # the arguments each framework's tool was called with


def weather(city: str) -> str:
    CALLS.append(city)
    return f"sunny, 24 C in {city}"


def reply(prompt: str) -> str:
    """The scripted model: a call, or after an observation the final answer quoting it."""
    head, sep, observation = prompt.rpartition("\nObservation: ")
    if sep and observation.endswith("\nThought:"):
        return f" I now know the final answer\nFinal Answer: The weather: {observation[:-len(chr(10) + 'Thought:')]}"
    assert "get_weather: Call this tool to interact with the get_weather API." in prompt  # the ReAct instruction
    return CALL


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    llm = LLM(tiny_ckpt, device="cpu")
    head = PromptScriptedHead(llm.tokenizer, llm.model, llm.runner, reply)
    engine = AsyncEngine(llm)
    with ServerThread(create_app(engine, llm.tokenizer, "qwen")) as srv:
        srv.head = head
        yield srv
    engine.shutdown()


@pytest.fixture(autouse=True)
def fresh(server):
    CALLS.clear()
    server.head.use(reply)


def test_langchain_bind_tools_round_trip(server):
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the weather of a city."""
        return weather(city)

    chat = ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="qwen", temperature=0, max_retries=0)
    bound = chat.bind_tools([get_weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = bound.invoke(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert "made up" not in ai.content  # the server stopped at "Observation:"
    messages += [ai] + [get_weather.invoke(c) for c in ai.tool_calls]  # ToolMessages
    final = bound.invoke(messages)
    assert CALLS == ["Paris"] and not final.tool_calls
    assert final.content == "The weather: sunny, 24 C in Paris"
    # The result went back as the ReAct observation of the assistant's own call.
    assert server.head.prompts[-1].endswith('Action: get_weather\nAction Input: {"city": "Paris"}\n'
                                            'Observation: sunny, 24 C in Paris\nThought:')


def test_qwen_agent_assistant_calls_the_tool(server):
    from qwen_agent.agents import Assistant
    from qwen_agent.tools.base import BaseTool, register_tool

    @register_tool("get_weather", allow_overwrite=True)
    class GetWeather(BaseTool):
        description = "Get the weather of a city."
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

        def call(self, params, **kwargs):
            return weather(json5.loads(params)["city"])

    # use_raw_api: Qwen-Agent sends the tools to the server (OpenAI `tools`) and reads back `tool_calls`, so
    # the server writes Qwen v1's own ReAct prompt; without it Qwen-Agent would prompt in a later format.
    bot = Assistant(llm={"model": "qwen", "model_server": server.url + "/v1", "api_key": "none",
                         "generate_cfg": {"use_raw_api": True, "temperature": 0}},
                    function_list=["get_weather"])
    responses = []
    for responses in bot.run(messages=[{"role": "user", "content": "What is the weather in Paris?"}]):
        pass
    assert CALLS == ["Paris"]
    thought, call, result, answer = responses  # the server streams the call's Thought as content
    assert thought == {"role": "assistant", "content": "I should look up the weather."}
    assert call["function_call"]["name"] == "get_weather"
    assert json.loads(call["function_call"]["arguments"]) == {"city": "Paris"}
    assert result["role"] == "function" and result["content"] == "sunny, 24 C in Paris"
    assert answer["role"] == "assistant" and answer["content"] == "The weather: sunny, 24 C in Paris"
