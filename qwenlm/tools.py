"""ReAct function calling for Qwen (v1): the tool prompt, OpenAI messages -> chat turns, reply parsing.

Qwen v1 was trained to call tools in ReAct text (Thought / Action / Action Input / Observation), not in a
JSON tool-call format. This follows the official `openai_api.py` (spec §13) exactly where it defines
behaviour: TOOL_DESC and REACT_INSTRUCTION verbatim, `parse_messages` (where the instruction goes, how
assistant calls and tool results are written back) and `parse_response`. No library implements Qwen's
ReAct dialect, hence this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from qwenlm.chat import build_chat_prompt
from qwenlm.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
OBSERVATION_STOP = "Observation:"

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} API "
    "useful for? {description_for_model} Parameters: {parameters}"
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


class MessagesError(ValueError):
    """The messages/tools of a request cannot be turned into a Qwen prompt; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def functions_from_tools(tools: list[dict] | None, functions: list[dict] | None) -> list[dict]:
    """OpenAI `tools` ([{type: "function", function: {...}}]) or legacy `functions` -> plain function dicts.

    Qwen-style dicts (name_for_model, name_for_human, description_for_model) pass through unchanged.
    """
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
                tool.get("function"), dict):
            raise MessagesError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        out.append(tool["function"])
    out.extend(functions or [])
    for i, fn in enumerate(out):
        if not isinstance(fn, dict) or not isinstance(fn.get("name_for_model", fn.get("name")), str):
            raise MessagesError(f"function {i} has no string 'name'", "tools" if tools else "functions")
    return out


def function_name(fn: dict) -> str:
    return fn.get("name_for_model", fn.get("name"))


def build_react_instruction(functions: list[dict]) -> str:
    """The official REACT_INSTRUCTION filled with the functions (spec §13)."""
    descs, names = [], []
    for fn in functions:
        name = function_name(fn)
        descs.append(TOOL_DESC.format(
            name_for_model=name,
            name_for_human=fn.get("name_for_human", name),
            description_for_model=fn.get("description_for_model", fn.get("description", "")),
            parameters=json.dumps(fn.get("parameters", {}), ensure_ascii=False),
        ))
        names.append(name)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(descs), tools_name_text=", ".join(names))


@dataclass
class ChatTurns:
    """A conversation in the shape the ChatML builder takes.

    When `continuation` is not None the prompt ends inside an assistant turn: build the prompt for `query`
    and `history` as usual (it ends with "<|im_start|>assistant\\n") and append `continuation` (encoded as
    plain text) so the model continues that turn (used after a tool result, as the official server does).
    """

    system: str
    history: list[tuple[str, str]] = field(default_factory=list)
    query: str = ""
    continuation: str | None = None


def _text(content, where: str) -> str:
    """Message content as text: a string, None, or OpenAI content parts of type "text"."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MessagesError(f"{where}: only text content parts are supported", where)
            parts.append(part["text"])
        return "\n".join(parts)
    raise MessagesError(f"{where}: content must be a string or a list of text parts", where)


def _clean(text: str) -> str:
    # The official server and react_demo.py strip this way: the training data was built so (spec §18).
    return text.lstrip("\n").rstrip()


def _assistant_text(msg: dict, where: str, with_tools: bool) -> str:
    """An assistant message in ReAct text: its tool calls become Action lines, plain answers Final Answer."""
    content = _clean(_text(msg.get("content"), where))
    calls = []
    if msg.get("function_call"):
        calls.append(msg["function_call"])
    for tc in msg.get("tool_calls") or []:
        calls.append(tc.get("function", {}) if isinstance(tc, dict) else {})
    if calls:
        if not content.startswith("Thought:"):
            content = f"Thought: {content}"
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise MessagesError(f"{where}: a function call needs a string 'name'", where)
            args = call.get("arguments", "")
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            content += f"\nAction: {call['name']}\nAction Input: {args}"
        return content
    if with_tools and not content.startswith("Thought:"):
        return f"Thought: I now know the final answer.\nFinal Answer: {content}"
    return content


def messages_to_turns(messages: list[dict], functions: list[dict] | None = None) -> ChatTurns:
    """OpenAI chat messages -> (system, history pairs, query[, continuation]), as official `parse_messages`.

    Roles: system (first message only), user, assistant (with optional tool_calls / function_call),
    tool / function (a tool result: appended to the preceding assistant turn as "\\nObservation: ...").
    Consecutive user messages are joined with a newline (the official server refuses them).
    """
    if not isinstance(messages, list) or not messages:
        raise MessagesError("messages must be a non-empty list", "messages")
    system = DEFAULT_SYSTEM
    turns: list[list] = []  # [role, text] with role "user" or "assistant", alternating
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or "role" not in msg:
            raise MessagesError(f"{where} has no 'role'", where)
        role = msg["role"]
        if role in ("system", "developer"):
            if i != 0:
                raise MessagesError(f"{where}: a system message is only allowed first", where)
            system = _clean(_text(msg.get("content"), where))
            continue
        if role == "user":
            text = _clean(_text(msg.get("content"), where))
            if turns and turns[-1][0] == "user":
                turns[-1][1] += "\n" + text
            else:
                turns.append(["user", text])
        elif role == "assistant":
            text = _assistant_text(msg, where, bool(functions))
            if turns and turns[-1][0] == "assistant":
                turns[-1][1] += "\n" + text
            else:
                if not turns:
                    raise MessagesError(f"{where}: an assistant message must follow a user message", where)
                turns.append(["assistant", text])
        elif role in ("tool", "function"):
            if not turns or turns[-1][0] != "assistant":
                raise MessagesError(f"{where}: a {role} result must follow an assistant message", where)
            turns[-1][1] += f"\nObservation: {_clean(_text(msg.get('content'), where))}"
        else:
            raise MessagesError(f"{where}: invalid role {role!r} (system, user, assistant, tool, function)", where)
    if not any(role == "user" for role, _ in turns):
        raise MessagesError("messages need at least one user message", "messages")

    continuation = None
    if turns[-1][0] == "assistant":  # continue the last assistant turn (after a tool result: "Thought:")
        continuation = turns.pop()[1]
        prefix = reply_prefix(messages)
        if prefix:
            continuation += "\n" + prefix
    query = turns.pop()[1]
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns), 2)]
    if functions:  # the instruction goes into the last history turn, else the query (official policy)
        instruction = build_react_instruction(functions)
        if history:
            q, r = history[-1]
            history[-1] = (f"{instruction}\n\nQuestion: {q}", r)
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    return ChatTurns(system=system, history=history, query=query, continuation=continuation)


def reply_prefix(messages: list[dict]) -> str:
    """The start of the reply that the prompt already holds: after a tool result the model continues
    "Observation: ...\nThought:", so its reply reads as the rest of a Thought."""
    return "Thought:" if messages[-1].get("role") in ("tool", "function") else ""


def turns_prompt_ids(tok: Tokenizer, turns: ChatTurns, max_window_size: int) -> list[int]:
    """The token ids of the ChatML prompt for `turns` (the server and the agent share this)."""
    _, ids = build_chat_prompt(tok, turns.query, turns.history, turns.system, max_window_size=max_window_size)
    if turns.continuation is not None:  # the prompt ends inside the assistant turn (after a tool result)
        ids = ids + tok.encode(turns.continuation)
    return ids


@dataclass
class ParsedReply:
    content: str
    name: str | None = None  # set when the reply is a tool call
    arguments: str | None = None


def parse_react_reply(text: str) -> ParsedReply:
    """A model reply -> a tool call (Action / Action Input) or plain content (official `parse_response`).

    The reply usually ends just before "Observation:" (a stop string), so a missing Observation is fine.
    """
    i = text.find("\nAction:")
    j = text.find("\nAction Input:")
    if i < 0 and text.startswith("Action:"):  # a reply that opens with the action (no Thought line)
        text = "\n" + text
        i, j = 0, text.find("\nAction Input:")
    if 0 <= i < j:
        k = text.find("\nObservation:", j)
        if k < 0:
            k = len(text)
        name = text[i + len("\nAction:"):j].strip()
        arguments = text[j + len("\nAction Input:"):k].strip()
        thought = text[:i]
        t = thought.find("Thought:")
        if t >= 0:
            thought = thought[t + len("Thought:"):]
        if name:
            return ParsedReply(content=thought.strip(), name=name, arguments=arguments)
    z = text.rfind("Final Answer:")
    if z >= 0:
        text = text[z + len("Final Answer:"):]
    return ParsedReply(content=text.strip())


class ReactStreamParser:
    """Incremental `parse_react_reply` for streamed replies.

    Thought text is held back until the reply shows what it is: after "Final Answer:" the answer streams
    as it comes; after "Action:" the call is kept whole and handed out by `finish`; a reply that does not
    open with a ReAct keyword streams as plain content from its first characters.
    """

    _MARKERS = ("Thought:", "Action:", "Final Answer:")

    def __init__(self, prefix: str = ""):
        """prefix: `reply_prefix` of the request (the reply is read as if it followed it)."""
        self.prefix = prefix
        self.text = prefix
        self.mode = "undecided"  # -> "answer" | "plain" | "call"
        self.sent = len(prefix)  # chars of self.text already handed out as content (or skipped)
        self.started = False  # whether any content was handed out (leading blanks are dropped)

    def feed(self, delta: str) -> str:
        """Add generated text; return the content that can be streamed now."""
        self.text += delta
        if self.mode == "undecided":
            a = 0 if self.text.startswith("Action:") else self.text.find("\nAction:")
            z = self.text.find("Final Answer:")
            if a >= 0 and (z < 0 or a < z):
                self.mode = "call"
            elif z >= 0:
                self.mode, self.sent = "answer", z + len("Final Answer:")
            else:
                head = self.text.lstrip()
                if head and not any(head.startswith(m) or m.startswith(head) for m in self._MARKERS):
                    self.mode = "plain"
        if self.mode not in ("answer", "plain"):
            return ""
        out = self.text[self.sent:]
        if not self.started:
            stripped = out.lstrip()
            self.sent += len(out) - len(stripped)
            out = stripped
            self.started = bool(out)
        self.sent += len(out)
        return out

    def finish(self) -> ParsedReply:
        """At the end: the content not streamed yet, and the tool call if the reply is one."""
        if self.mode in ("answer", "plain"):
            return ParsedReply(content="")
        return parse_react_reply(self.text[len(self.prefix):])  # what the whole reply gives unstreamed
