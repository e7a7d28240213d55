"""One parser per input format: a raw row (a dict) -> a Pair, the pieces of a canonical record.

A parser only finds the pieces where its format keeps them; formats.py then makes the record after the checks every
format shares (system turns, the turn the prompt ends on, empty or identical answers), in one place. A row a parser
cannot use raises RowError, whose message is the reason the user sees beside the row's file:line.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple


class RowError(Exception):
    """A bad row; the message is the reason. Caught in formats.parse_line, never seen by a user as a traceback."""


class Pair(NamedTuple):
    turns: list  # [{"role", "content"}] up to the answers; leading "system" turns are allowed here
    chosen: str
    rejected: str
    system: str | None = None
    tools: str | None = None  # JSON text of a list
    images: int = 0


UNPAIRED_REASON = (
    "unpaired KTO data: each row holds one answer with a boolean 'label', but raydpo trains DPO on pairs (a chosen "
    "and a rejected answer to the same prompt); pair a label=true and a label=false answer per prompt into "
    "chosen/rejected first")

# speakers of chat messages, across OpenAI, TRL, NeMo and When2Call rows
CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system", "tool": "tool",
              "function": "tool"}
# LLaMA-Factory's ShareGPT speakers. function_call is the model's own call (LLaMA-Factory renders it as the
# assistant's turn), observation the tool's answer.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
NOVA_IMAGE_FORMATS = ("jpeg", "png", "gif", "webp")
NOVA_MAX_IMAGES_PER_MESSAGE = 10
_S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/\S+")
_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ANSWER = "\n\nAssistant:"
_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object"}


def need(obj: dict, key: str, kind: type | None = None):
    if key not in obj:
        raise RowError(f"missing key '{key}'")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise RowError(f"'{key}' must be {_TYPE_NAMES[kind]}, not {type(value).__name__}")
    return value


def tools_text(value) -> str | None:
    """Tool specs as JSON text of a list (Arrow needs one type), from a list, JSON text, or a list of JSON texts."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _json(value, "'tools'")
    if not isinstance(value, list):
        raise RowError(f"'tools' must be a list of tool specs or JSON text of one, not {type(value).__name__}")
    specs = [_json(spec, f"tools[{i}]") if isinstance(spec, str) else spec for i, spec in enumerate(value, 1)]
    return json.dumps(specs, ensure_ascii=False) if specs else None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError(f"{where} is not valid JSON: {err.msg} at column {err.colno}") from None


def chat_text(content, where: str) -> tuple[str, int]:
    """(text, image count) of an OpenAI-style content: a string, or parts [{type: text|image_url|image}]."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise RowError(f"{where}: content must be a string or a list of parts, not {type(content).__name__}")
    texts, images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "image"):
            images += 1
        else:
            raise RowError(f"{where}: unsupported content part {json.dumps(part, ensure_ascii=False)[:80]}")
    return "\n".join(texts), images


def chat_turns(messages, where: str) -> tuple[list, int]:
    """[{"role", "content"}] messages -> (turns, image count). An assistant's tool calls become JSON text."""
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{where}' must be a non-empty list of messages")
    turns, images = [], 0
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message:
            raise RowError(f"{where}[{i}] is not a {{role, content}} message")
        role = CHAT_ROLES.get(message["role"])
        if role is None:
            raise RowError(f"{where}[{i}]: unknown role {message['role']!r} (expected user, assistant, system, tool)")
        text, count = chat_text(message.get("content"), f"{where}[{i}]")
        if message.get("tool_calls"):
            calls = json.dumps(message["tool_calls"], ensure_ascii=False)
            text = f"{text}\n{calls}" if text else calls
        turns.append({"role": role, "content": text})
        images += count
    return turns, images


def answer_text(value, where: str) -> str:
    """A final answer given as a string, one assistant message, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(f"'{where}' must be a string or one assistant message")
    if len(value) != 1:
        raise RowError(f"'{where}' holds {len(value)} messages; raydpo trains on one final assistant answer")
    turns, images = chat_turns(value, where)
    if turns[0]["role"] != "assistant":
        raise RowError(f"'{where}' must be an assistant message, not {turns[0]['role']}")
    if images:
        raise RowError(f"'{where}' holds an image; answers must be text")
    return turns[0]["content"]


# --- the formats --------------------------------------------------------------------------------------------------

def parse_trl(obj: dict) -> Pair:
    """TRL preference rows: standard (strings) or conversational (message lists, the prompt explicit or implicit).

    Also PAI-QuickStart's prompt/chosen/rejected strings, with an optional 'system' string."""
    chosen, rejected, prompt = need(obj, "chosen"), need(obj, "rejected"), obj.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected and not isinstance(prompt, list):
        # Implicit prompt: TRL (our reference) takes the longest shared run of leading turns.
        from trl.data_utils import maybe_extract_prompt

        example = {"chosen": chosen, "rejected": rejected, **({} if prompt is None else {"prompt": prompt})}
        example = maybe_extract_prompt(example)
        prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
        if not prompt:
            raise RowError("chosen and rejected share no leading turns, so there is no prompt to extract")
    if prompt is None:
        raise RowError("missing key 'prompt' (for Anthropic HH dialogues use format hh)")
    if isinstance(prompt, str):
        turns, images = [{"role": "user", "content": prompt}], 0
    else:
        turns, images = chat_turns(prompt, "prompt")
    images = max(images, len(obj.get("images") or ()))
    return Pair(turns, answer_text(chosen, "chosen"), answer_text(rejected, "rejected"), system=_system_key(obj),
                tools=tools_text(obj.get("tools")), images=images)


def _system_key(obj: dict) -> str | None:
    """An optional top-level 'system' string (PAI-QuickStart / Orca-style rows keep the system prompt there)."""
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("'system' must be a string")
    return system or None


def hh_turns(dialogue: str, where: str) -> list:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> turns (each stripped, as TRL's hh-rlhf script does)."""
    pieces = _HH_SPEAKER.split(dialogue)
    if pieces[0].strip():
        raise RowError(f"'{where}' has text before its first '\\n\\nHuman:'")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
            for speaker, text in zip(pieces[1::2], pieces[2::2])]


def parse_hh(obj: dict) -> Pair:
    """Anthropic HH: the prompt is everything before the last '\\n\\nAssistant:' and must be the same in both.

    The edge cases of harmless-base/test (SOURCE.txt), both bad rows with a reason, never repaired:
    - an empty final turn (lines 87, 517, 926, 1104: chosen ends "Assistant: ") -> "empty chosen response";
      there is no answer to prefer.
    - prefixes that differ (lines 1255, 1689, 1951, 1953, 2037: an answer holding extra "\\n\\nAssistant:" turns, or
      different earlier turns) -> "chosen and rejected differ before their last ...": the two answers do not
      answer one prompt, and guessing a shared part would train on a prompt nobody wrote.
    """
    halves = {}
    for key in ("chosen", "rejected"):
        dialogue = need(obj, key, str)
        cut = dialogue.rfind(_HH_ANSWER)
        if cut < 0:
            raise RowError(f"'{key}' has no '\\n\\nAssistant:' turn")
        halves[key] = (dialogue[:cut], dialogue[cut + len(_HH_ANSWER):].strip())
    if halves["chosen"][0] != halves["rejected"][0]:
        raise RowError("chosen and rejected differ before their last '\\n\\nAssistant:', so they share no prompt "
                       "(an HH pair must differ only in its final Assistant turn)")
    return Pair(hh_turns(halves["chosen"][0], "chosen"), halves["chosen"][1], halves["rejected"][1])


def _sharegpt_turn(message, where: str) -> dict:
    if not isinstance(message, dict) or "from" not in message or not isinstance(message.get("value"), str):
        raise RowError(f"{where} is not a {{from, value}} message with a string value")
    role = SHAREGPT_ROLES.get(message["from"])
    if role is None:
        raise RowError(f"{where}: unknown speaker {message['from']!r} "
                       "(expected human, gpt, system, function_call or observation)")
    return {"role": role, "content": message["value"]}


def _sharegpt_answer(value, where: str) -> str:
    if isinstance(value, str):
        return value
    turn = _sharegpt_turn(value, f"'{where}'")
    if turn["role"] != "assistant":
        raise RowError(f"'{where}' must come from gpt (the assistant), not {value['from']!r}")
    return turn["content"]


def parse_sharegpt(obj: dict) -> Pair:
    """LLaMA-Factory / MedicalGPT ShareGPT rows: conversations + chosen/rejected ({from, value} or strings)."""
    conversations = need(obj, "conversations", list)
    if not conversations:
        raise RowError("'conversations' is empty")
    turns = [_sharegpt_turn(m, f"conversations[{i}]") for i, m in enumerate(conversations, 1)]
    return Pair(turns, _sharegpt_answer(need(obj, "chosen"), "chosen"),
                _sharegpt_answer(need(obj, "rejected"), "rejected"), system=_system_key(obj),
                tools=tools_text(obj.get("tools")))


def _check_nova_image(image, where: str) -> None:
    if not isinstance(image, dict):
        raise RowError(f"{where}: an image must be an object")
    if image.get("format") not in NOVA_IMAGE_FORMATS:
        raise RowError(f"{where}: image format {image.get('format')!r} is not one of {', '.join(NOVA_IMAGE_FORMATS)}")
    source = image.get("source")
    location = source.get("s3Location") if isinstance(source, dict) else None
    if not isinstance(location, dict):
        raise RowError(f"{where}: image source must be {{s3Location: {{uri, bucketOwner}}}}")
    uri = location.get("uri")
    if not isinstance(uri, str) or not _S3_URI.fullmatch(uri):
        raise RowError(f"{where}: image uri {uri!r} is not an s3://bucket/key address")
    owner = location.get("bucketOwner")
    if owner is not None and not (isinstance(owner, str) and re.fullmatch(r"\d{12}", owner)):
        raise RowError(f"{where}: bucketOwner {owner!r} is not a 12-digit AWS account id")


def nova_content(content, where: str) -> tuple[str, int]:
    """Nova content objects [{text} | {image}] -> (texts joined with newlines, image count), limits checked."""
    if not isinstance(content, list) or not content:
        raise RowError(f"{where}: content must be a non-empty list of {{text}} or {{image}} objects")
    texts, images = [], 0
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and "image" in part:
            _check_nova_image(part["image"], where)
            images += 1
        else:
            keys = sorted(part) if isinstance(part, dict) else type(part).__name__
            raise RowError(f"{where}: unsupported content object {keys}; Nova DPO rows hold text and image objects")
    if images > NOVA_MAX_IMAGES_PER_MESSAGE:
        raise RowError(f"{where} holds {images} images; Nova allows at most {NOVA_MAX_IMAGES_PER_MESSAGE} per message")
    return "\n".join(texts), images


def nova_parts(content: list) -> list[dict]:
    """A checked Nova content list as chat-template parts, in order: {"type": "text", "text"} and {"type": "image",
    "uri", "format"}; the vision-language data stage (core/data/images.py) puts each image where it stood."""
    return [{"type": "text", "text": part["text"]} if isinstance(part.get("text"), str) else
            {"type": "image", "uri": part["image"]["source"]["s3Location"]["uri"], "format": part["image"]["format"]}
            for part in content]


def _nova_candidates(candidates) -> tuple[str, str]:
    if not isinstance(candidates, list):
        raise RowError("'candidates' must be a list")
    if len(candidates) != 2:
        raise RowError(f"{len(candidates)} candidates; a Nova DPO turn holds exactly one preferred and one "
                       "non-preferred candidate")
    by_label = {"preferred": [], "non-preferred": []}
    for i, candidate in enumerate(candidates, 1):
        label = candidate.get("preferenceLabel") if isinstance(candidate, dict) else None
        if label not in by_label:
            raise RowError(f"candidate {i}: preferenceLabel {label!r} is neither 'preferred' nor 'non-preferred'")
        by_label[label].append(candidate)
    if len(by_label["preferred"]) != 1:
        raise RowError("no preferred candidate" if not by_label["preferred"] else "two preferred candidates")
    answers = []
    for label in ("preferred", "non-preferred"):
        text, images = nova_content(by_label[label][0].get("content"), f"{label} candidate")
        if images:
            raise RowError(f"{label} candidate holds an image; answers must be text")
        answers.append(text)
    return answers[0], answers[1]


def parse_nova(obj: dict) -> Pair:
    """SageMaker Nova DPO rows: system [{text}], messages, the last assistant turn holding two candidates."""
    messages = need(obj, "messages", list)
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or "candidates" not in last:
        raise RowError("the last message has no 'candidates' (a Nova DPO row ends with an assistant turn holding "
                       "a preferred and a non-preferred candidate)")
    turns, images = [], 0
    for i, message in enumerate(messages[:-1], 1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise RowError(f"messages[{i}]: role {role!r}; Nova messages are user or assistant")
        if "candidates" in message:
            raise RowError(f"messages[{i}] holds candidates; only the last turn may")
        text, count = nova_content(message.get("content"), f"messages[{i}]")
        turns.append({"role": role, "content": text} | ({"parts": nova_parts(message["content"])} if count else {}))
        images += count
    if last.get("role") != "assistant":
        raise RowError("the turn holding the candidates must be an assistant turn")
    if not turns or turns[0]["role"] != "user":
        raise RowError("a Nova row starts with a user turn")
    chosen, rejected = _nova_candidates(last["candidates"])
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                                   for s in system):
            raise RowError("'system' must be a list of {text} objects")
        system = "\n".join(s["text"] for s in system) or None
    return Pair(turns, chosen, rejected, system=system, images=images)


def parse_openai(obj: dict) -> Pair:
    """OpenAI / Azure OpenAI DPO fine-tuning rows: input {messages, tools}, preferred/non_preferred_output."""
    request = need(obj, "input", dict)
    turns, images = chat_turns(request.get("messages"), "input.messages")
    return Pair(turns, answer_text(need(obj, "preferred_output"), "preferred_output"),
                answer_text(need(obj, "non_preferred_output"), "non_preferred_output"),
                tools=tools_text(request.get("tools")), images=images)


def parse_nemo(obj: dict) -> Pair:
    """NeMo-RL preference rows: context (messages or a string), completions [{rank, completion}], lower rank wins."""
    context = need(obj, "context")
    turns, images = ([{"role": "user", "content": context}], 0) if isinstance(context, str) \
        else chat_turns(context, "context")
    completions = need(obj, "completions", list)
    if len(completions) != 2:
        raise RowError(f"{len(completions)} completions; raydpo needs exactly two (a preferred and a rejected one)")
    for i, completion in enumerate(completions, 1):
        if not isinstance(completion, dict) or "completion" not in completion:
            raise RowError(f"completions[{i}] has no 'completion'")
        if not isinstance(completion.get("rank"), int) or isinstance(completion.get("rank"), bool):
            raise RowError(f"completions[{i}] has no integer 'rank'")
    best, worst = sorted(completions, key=lambda c: c["rank"])
    if best["rank"] == worst["rank"]:
        raise RowError(f"both completions have rank {best['rank']}: no preferred completion (the lower rank wins)")
    return Pair(turns, answer_text(best["completion"], "preferred completion"),
                answer_text(worst["completion"], "rejected completion"), images=images)


def parse_when2call(obj: dict) -> Pair:
    """When2Call preference pairs: messages, tools, chosen_response, rejected_response."""
    turns, images = chat_turns(need(obj, "messages"), "messages")
    return Pair(turns, answer_text(need(obj, "chosen_response"), "chosen_response"),
                answer_text(need(obj, "rejected_response"), "rejected_response"),
                tools=tools_text(obj.get("tools")), images=images)


def parse_unpaired(obj: dict) -> Pair:
    raise RowError(UNPAIRED_REASON)


def is_unpaired(obj: dict) -> bool:
    """KTO-style rows: one answer with a boolean verdict, no second answer to compare with."""
    return isinstance(obj.get("label"), bool) and not {"chosen", "rejected", "candidates"} & set(obj)
