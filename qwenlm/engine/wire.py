"""The messages between the API process and the engine-core process (core.py, core_client.py), in msgpack.

msgspec encodes and decodes them: typed decoding straight into the engine's own dataclasses (RequestOutput,
CompletionOutput, SamplingParams, with their __post_init__ checks), at a few microseconds per output. Every
field of those dataclasses travels, so a field added to them travels too.

One `StepOut` per engine step carries all of that step's outputs. Outputs hold running totals (all token
ids so far, all text so far), which would make each step's message grow with the length of every reply:
the wire carries only what each output adds. `OutputPacker` (core side) cuts every list field of a
CompletionOutput and its `text` to the part not sent before, and sends a RequestOutput's other list fields
(the prompt ids, anything else about the prompt) in the request's first output only; `OutputUnpacker`
(client side) puts them back. The contract this relies on (outputs.py): a sample's list fields and `text`
only ever grow by appending, and a request's own list fields do not change.
"""

from __future__ import annotations

import dataclasses

import msgspec

from qwenlm.engine.outputs import CompletionOutput, RequestOutput
from qwenlm.sampling import SamplingParams

APPEND_ONLY_STR = ("text",)  # str fields of CompletionOutput that are running totals (text_delta is not)


# ---- API process -> core ---------------------------------------------------------------------------
class Add(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True):
    request_id: str


class StopAll(msgspec.Struct, tag=True):
    reason: str


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = Add | Abort | StopAll | Shutdown


# ---- core -> API process ---------------------------------------------------------------------------
class Failure(msgspec.Struct):
    request_id: str
    message: str
    stopped: bool = False  # ended by StopAll or shutdown (EngineStopped), not by a fault of its own


class Ready(msgspec.Struct, tag=True):
    max_model_len: int
    vocab_size: int  # the model's: prompt ids are checked against it before they reach the engine
    stats: dict


class StepOut(msgspec.Struct, tag=True):
    outputs: list[RequestOutput]
    failures: list[Failure]
    stats: dict  # LLMEngine.stats() after the step, for /metrics


class Fatal(msgspec.Struct, tag=True):
    message: str  # the engine could not be built (or its loop broke): why


Event = Ready | StepOut | Fatal

command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(Event)


_SAMPLE_FIELDS = [f.name for f in dataclasses.fields(CompletionOutput)]
_PROMPT_FIELDS = [f.name for f in dataclasses.fields(RequestOutput) if f.name != "outputs"]


def _tail_fields(c: CompletionOutput) -> list[str]:
    """A sample's running totals: its list fields and `text`."""
    return [name for name in _SAMPLE_FIELDS if name in APPEND_ONLY_STR or isinstance(getattr(c, name), list)]


def _prompt_fields(out: RequestOutput) -> list[str]:
    """A request's list fields besides its samples (prompt ids, anything else about the prompt): the same in
    every output of the request, so sent in its first only."""
    return [name for name in _PROMPT_FIELDS if isinstance(getattr(out, name), list)]


class OutputPacker:
    """Core side: each output cut, in place, to the part its request has not been sent yet (the engine makes
    new output objects every step and keeps no reference to them)."""

    def __init__(self):
        self._sent: dict[str, dict[tuple[int, str], int]] = {}  # request -> (sample, field) -> items sent

    def pack(self, out: RequestOutput) -> RequestOutput:
        if out.request_id in self._sent:
            for name in _prompt_fields(out):
                setattr(out, name, [])
        sent = self._sent.setdefault(out.request_id, {})
        for c in out.outputs:
            for name in _tail_fields(c):
                value = getattr(c, name)
                n = sent.get((c.index, name), 0)
                sent[(c.index, name)] = len(value)
                if n:
                    setattr(c, name, value[n:])
        if out.finished:
            del self._sent[out.request_id]
        return out

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


class OutputUnpacker:
    """Client side: the running totals and the prompt fields back, each output with lists of its own (a consumer
    may keep it)."""

    def __init__(self):
        self._prompt: dict[str, dict[str, list]] = {}  # request -> its prompt fields, from its first output
        self._totals: dict[str, dict[int, CompletionOutput]] = {}  # request -> sample -> its last output

    def unpack(self, out: RequestOutput) -> RequestOutput:
        rid = out.request_id
        if rid in self._prompt:
            for name, value in self._prompt[rid].items():
                setattr(out, name, value)
        else:
            self._prompt[rid] = {name: getattr(out, name) for name in _prompt_fields(out)}
        totals = self._totals.setdefault(rid, {})
        for c in out.outputs:
            prev = totals.get(c.index)
            if prev is not None:
                for name in _tail_fields(c):
                    before = getattr(prev, name)
                    if before:
                        setattr(c, name, before + getattr(c, name))
            totals[c.index] = c
        if out.finished:
            self.forget(rid)
        return out

    def forget(self, request_id: str) -> None:
        self._prompt.pop(request_id, None)
        self._totals.pop(request_id, None)
