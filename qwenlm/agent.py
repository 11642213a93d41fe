"""A ReAct agent from Python: Qwen (v1) calls Python functions until it writes a Final Answer.

The prompt and the reply parser are the server's (`qwenlm.tools`): each step is the conversation the
OpenAI-compatible server would see — the user query, the assistant's tool calls, the tool results — turned
into Qwen's ReAct prompt by `messages_to_turns`, generated up to "Observation:" and read back by
`parse_react_reply`. The agent adds only what a server leaves to its client: calling the tool and writing
its result (or its error) back as the observation.

    @tool(parameters={"type": "object", "properties": {"city": {"type": "string"}}})
    def get_weather(city):
        "Get the weather of a city."
        return f"sunny in {city}"

    result = Agent(llm, tools=[get_weather]).run("Weather in Paris?")
    result.answer, result.steps
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import json5

from qwenlm.chat import DEFAULT_SYSTEM, History, chat_stop_ids, validate_history
from qwenlm.tools import OBSERVATION_STOP, function_name, functions_from_tools, messages_to_turns, \
    parse_react_reply, turns_prompt_ids


@dataclass
class Tool:
    """A callable and the function description the model sees: OpenAI `{name, description, parameters}`
    or Qwen's `{name_for_model, name_for_human, description_for_model, parameters}`."""

    function: dict
    fn: Callable

    @property
    def name(self) -> str:
        return function_name(self.function)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         parameters: dict | None = None):
    """Decorator marking a function as a tool: the name defaults to the function's, the description to
    its docstring, the parameters (a JSON schema) to an object without properties."""

    def mark(f: Callable) -> Callable:
        f.qwen_tool = Tool({"name": name or f.__name__,
                            "description": description if description is not None else (f.__doc__ or "").strip(),
                            "parameters": parameters or {"type": "object", "properties": {}}}, f)
        return f

    return mark(fn) if fn is not None else mark


def as_tool(item) -> Tool:
    """A Tool from a Tool, a function (decorated with @tool or not), or a (description dict, callable) pair;
    the dict may be OpenAI's `{"type": "function", "function": {...}}`, a plain function or a Qwen plugin."""
    if isinstance(item, Tool):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], dict) and callable(item[1]):
        spec, fn = item
        if "function" in spec:
            return Tool(functions_from_tools([spec], None)[0], fn)
        return Tool(functions_from_tools(None, [spec])[0], fn)
    if callable(item):
        return getattr(item, "qwen_tool", None) or tool(item).qwen_tool
    raise TypeError(f"a tool must be a function, a Tool or a (description dict, function) pair, got {item!r:.80}")


@dataclass
class Step:
    """One tool call: the model's thought, the tool it named, its Action Input as written, and what the tool
    (or the agent, for an unknown tool or unreadable input) answered."""

    thought: str
    action: str
    input: str
    observation: str


@dataclass
class AgentResult:
    answer: str
    steps: list[Step] = field(default_factory=list)
    finished: bool = True  # False when the step limit ended the run before a Final Answer
    history: History = field(default_factory=list)  # the caller's history + (query, answer)


def parse_arguments(text: str):
    """A model's Action Input: JSON, else JSON5 (the model writes single quotes or trailing commas at times);
    empty input means no arguments."""
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return json5.loads(text)


def _observation_text(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


class Agent:
    """Runs Qwen's ReAct loop over `tools` with `llm` (a `qwenlm.QwenLM`).

    Keyword arguments beyond the listed ones are generation settings, as for `llm.chat` (temperature,
    top_p, max_new_tokens, seed, ...); generation always also stops at "Observation:".
    """

    def __init__(self, llm, tools: list, system: str = DEFAULT_SYSTEM, max_steps: int = 8, **overrides):
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.llm = llm
        self.tools = {}
        for item in tools:
            t = as_tool(item)
            if t.name in self.tools:
                raise ValueError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t
        if not self.tools:
            raise ValueError("an agent needs at least one tool")
        self.system = system
        self.max_steps = max_steps
        stop = list(overrides.pop("stop", None) or [])
        self.params = llm.sampling_params(stop=stop + [OBSERVATION_STOP], **overrides)  # checked now

    def run(self, query: str, history: History | None = None) -> AgentResult:
        """Answer `query`, calling tools as the model asks; the result holds the answer and every step."""
        for event in self.stream(query, history):
            if isinstance(event, AgentResult):
                return event
        raise AssertionError("stream ends with its result")

    def stream(self, query: str, history: History | None = None) -> Iterator[Step | AgentResult]:
        """Yield each Step once its tool has answered, then the AgentResult."""
        history = validate_history(history)
        functions = [t.function for t in self.tools.values()]
        messages = [{"role": "system", "content": self.system}]
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": query})
        steps: list[Step] = []
        for _ in range(self.max_steps):
            turns = messages_to_turns(messages, functions)
            reply = parse_react_reply(self._generate(
                turns_prompt_ids(self.llm.tokenizer, turns, self.llm.generation_config.max_window_size)))
            if reply.name is None:
                yield AgentResult(reply.content, steps, True, history + [(query, reply.content)])
                return
            step = Step(reply.content, reply.name, reply.arguments, self._call(reply.name, reply.arguments))
            steps.append(step)
            yield step
            # Written back as the server's client would: the model's own Action Input text, then the result.
            messages += [{"role": "assistant", "content": step.thought, "tool_calls": [
                {"type": "function", "function": {"name": step.action, "arguments": step.input}}]},
                {"role": "tool", "content": step.observation}]
        answer = f"Stopped: the step limit ({self.max_steps}) was reached before a final answer."
        yield AgentResult(answer, steps, False, history + [(query, answer)])

    def _generate(self, ids: list[int]) -> str:
        """The model's reply to prompt `ids`, cut before "Observation:"."""
        text = ""
        for step in self.llm._stream_texts([ids], self.params, chat_stop_ids(self.llm.tokenizer)):
            text += step[0][0]
        return text.strip()

    def _call(self, name: str, arguments: str) -> str:
        """Run a tool; every failure becomes the observation, so the model can correct itself."""
        t = self.tools.get(name)
        if t is None:
            return f"Error: there is no tool named {name!r}; the tools are: {', '.join(self.tools)}."
        try:
            args = parse_arguments(arguments)
        except ValueError as e:
            return f"Error: the Action Input is not valid JSON ({e}); write it as a JSON object."
        try:
            result = t.fn(**args) if isinstance(args, dict) else t.fn(args)
        except Exception as e:  # noqa: BLE001 - the model sees the tool's error and may retry
            return f"Error: {type(e).__name__}: {e}"
        return _observation_text(result)
