"""The messages between the API process and the engine-core process (core.py, core_client.py), in msgpack.

msgspec encodes and decodes them: typed decoding straight into the engine's own dataclasses (RequestOutput,
CompletionOutput, SamplingParams, with their __post_init__ checks), at a few microseconds per output. Every
field of those dataclasses travels, so a field added to them travels too.

One `StepOut` per engine step carries all of that step's outputs. Outputs hold running totals (all token
ids so far, all text so far), which would make each step's message grow with the length of every reply:
the wire carries only what each output adds. `OutputPacker` (core side) cuts every list field of a
CompletionOutput and its `text` to the part not sent before, and the prompt ids (the client has them);
`OutputUnpacker` (client side) puts the totals back. The contract this relies on (outputs.py): list fields
and `text` only ever grow by appending.
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


_FIELDS = [f.name for f in dataclasses.fields(CompletionOutput)]


def _tail_fields(c: CompletionOutput) -> list[str]:
    return [name for name in _FIELDS if name in APPEND_ONLY_STR or isinstance(getattr(c, name), list)]


class OutputPacker:
    """Core side: each output cut, in place, to the part its request has not been sent yet (the engine makes
    new output objects every step and keeps no reference to them)."""

    def __init__(self):
        self._sent: dict[str, dict[tuple[int, str], int]] = {}  # request -> (sample, field) -> items sent

    def pack(self, out: RequestOutput) -> RequestOutput:
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
        out.prompt_token_ids = []
        return out

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


class OutputUnpacker:
    """Client side: the running totals back, each output with lists of its own (a consumer may keep it)."""

    def __init__(self):
        self._totals: dict[str, dict[int, CompletionOutput]] = {}

    def unpack(self, out: RequestOutput, prompt_token_ids: list[int]) -> RequestOutput:
        totals = self._totals.setdefault(out.request_id, {})
        for i, c in enumerate(out.outputs):
            prev = totals.get(c.index)
            if prev is not None:
                for name in _tail_fields(c):
                    before = getattr(prev, name)
                    if before:
                        setattr(c, name, before + getattr(c, name))
            totals[c.index] = c
        if out.finished:
            del self._totals[out.request_id]
        out.prompt_token_ids = prompt_token_ids
        return out

    def forget(self, request_id: str) -> None:
        self._totals.pop(request_id, None)
