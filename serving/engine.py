"""The transformers engine of a replica: one base model in memory, its LoRA adapters, batched generate.

A batch holds rows from many requests (Ray Serve's @serve.batch gathers them). Rows that sample alike (greedy, or
the same temperature/top_p/seed) run in one left-padded generate() call; each row names its adapter, and peft's
mixed-adapter batches (`adapter_names=`, "__base__" for the bare base) apply it per row, so requests for different
runs of one base share a forward pass. A streamer sees every step's tokens for all rows: it cuts each row at its end
token, its stop strings or its max_tokens, feeds the row's text to its sink as it grows (streaming), and a stopping
criterion tells generate() which rows are done, so a batch ends when its last row does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from serving.openai_api import Choice, cut_at_stop, safe_prefix_length
from serving.sources import ModelGroup

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass
class Row:
    """One answer to generate: a request with n=3 is three rows."""
    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str = BASE_ADAPTER
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    index: int = 0
    sink: Callable[[str], None] | None = None   # receives text deltas as they are generated
    request: str = ""                            # rows of one request share it (a seed repeats only its own rows)

    def sampling_key(self) -> tuple:
        """Rows with equal keys share a generate() call. A seeded request's rows run alone (with each other):
        sharing the seeded generator with another request's rows would make its samples depend on the batch."""
        if self.temperature <= 0:
            return (0.0, 1.0, None, "")
        return (self.temperature, self.top_p, self.seed, self.request if self.seed is not None else "")


@dataclass
class _RowState:
    row: Row
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    done: bool = False
    finish_reason: str = "length"


def group_rows(rows: list[Row]) -> list[list[int]]:
    """Positions of the rows that can share one generate() call, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.sampling_key(), []).append(i)
    return list(groups.values())


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) padded on the left: generation continues every row at its right end."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return ids, mask


class TransformersEngine:
    def __init__(self, group: ModelGroup, device: str = "cpu"):
        import torch

        from core.models import load_causal_lm, load_tokenizer

        self.group, self.device = group, device
        self.tokenizer = load_tokenizer(group.source)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = load_causal_lm(group.source, dtype=dtype)
        if group.adapters:
            from peft import PeftModel

            first, *rest = group.adapters
            model = PeftModel.from_pretrained(model, first.path, adapter_name=first.name)
            for adapter in rest:
                model.load_adapter(adapter.path, adapter_name=adapter.name)
        self.model = model.to(device).eval()
        config = getattr(self.model, "config", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.eos_ids = {i for i in [self.tokenizer.eos_token_id, *_as_list(
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None))] if i is not None}

    def generate(self, rows: list[Row]) -> list[Choice | Exception]:
        """One Choice per row, in order; rows' sinks get their text as it is generated. A generate() call that fails
        answers its own rows with the exception and leaves the batch's other rows (other requests) their answers."""
        results: list[Choice | Exception | None] = [None] * len(rows)
        for positions in group_rows(rows):
            try:
                answers = self._generate_alike([rows[p] for p in positions])
            except Exception as err:  # noqa: BLE001 - handed to the rows' callers, raised there
                answers = [err] * len(positions)
            for pos, answer in zip(positions, answers):
                results[pos] = answer
        return results  # type: ignore[return-value]

    def _generate_alike(self, rows: list[Row]) -> list[Choice]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        states = [_RowState(r) for r in rows]
        engine = self

        class RowStreamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() hands the prompt first
                    self.first = False
                    return
                for state, token in zip(states, value.reshape(-1).tolist()):
                    engine._advance(state, int(token))

            def end(self):
                pass

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([s.done for s in states], device=input_ids.device)

        ids, mask = left_pad([r.prompt_ids for r in rows], self.tokenizer.pad_token_id)
        head = rows[0]
        sampling = ({"do_sample": True, "temperature": head.temperature, "top_p": head.top_p, "top_k": 0}
                    if head.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                                  "top_k": None})
        extra = {"adapter_names": [r.adapter for r in rows]} if self.group.adapters else {}
        if head.temperature > 0 and head.seed is not None:
            torch.manual_seed(head.seed)
        with torch.no_grad():
            self.model.generate(
                input_ids=torch.tensor(ids, device=self.device), attention_mask=torch.tensor(mask, device=self.device),
                max_new_tokens=max(r.max_new_tokens for r in rows), pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.eos_ids), streamer=RowStreamer(),
                stopping_criteria=StoppingCriteriaList([RowsDone()]), **sampling, **extra)
        choices = []
        for state in states:
            if state.row.sink is None and not state.row.stops:
                state.text = self.tokenizer.decode(state.ids, skip_special_tokens=True)
            self._flush(state, final=True)
            choices.append(Choice(index=state.row.index, text=state.text, finish_reason=state.finish_reason,
                                  tokens=len(state.ids)))
        return choices

    def _advance(self, state: _RowState, token: int) -> None:
        if state.done:
            return
        if token in self.eos_ids:
            state.done, state.finish_reason = True, "stop"
            return
        state.ids.append(token)
        if state.row.sink is None and not state.row.stops:  # nobody reads the text before the end: decode once then
            if len(state.ids) >= state.row.max_new_tokens:
                state.done, state.finish_reason = True, "length"
            return
        state.text = self.tokenizer.decode(state.ids, skip_special_tokens=True)
        if state.row.stops:
            state.text, hit = cut_at_stop(state.text, state.row.stops)
            if hit:
                state.done, state.finish_reason = True, "stop"
        if not state.done and len(state.ids) >= state.row.max_new_tokens:
            state.done, state.finish_reason = True, "length"
        self._flush(state, final=state.done)

    def _flush(self, state: _RowState, final: bool) -> None:
        """Sends the row's new text; holds back a tail that may begin a stop string or a split character."""
        if state.row.sink is None:
            return
        ready = len(state.text) if final else safe_prefix_length(state.text, state.row.stops)
        if not final and state.text[:ready].endswith("\ufffd"):  # a multi-byte character still incomplete
            ready -= 1
        if ready > state.sent:
            state.row.sink(state.text[state.sent:ready])
            state.sent = ready


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


