"""Tool calls for models that have no tool format of their own. Pure: no I/O, no aiohttp.

The bundled Gemma 3 270M carries no chat template (the engine renders it with the built-in gemma3
format), so edgellm prompts it in one documented JSON format (docs/http.md, "Tool calls"):

- (a) `system_prompt(tools, choice)` lists the tools and says how to call one: reply with exactly
  `{"name": "<tool>", "arguments": {...}}`; `chat_turns()` folds the conversation's tool traffic
  into the three roles the protocol knows (a call becomes the assistant's JSON, a result a user turn);
- (b) `call_grammar(tools, choice)` is the GBNF a reply must match: for `auto` either plain text
  (not starting with `{`) or one call whose `name` is a given tool and whose `arguments` match that
  tool's `parameters` schema; for `required` or a named tool only the call. Built with llama.cpp's
  own JSON-schema converter (`llama_cpp.llama_grammar`);
- (c) `parse_call(text, tools)` turns a reply back into a `ToolCall`, shaped for Ollama by
  `ollama_tool_calls` and for OpenAI by `openai_tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.protocol import Code, EdgeError

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """`none` (tools ignored), `auto` (text or a call), `required` (a call), or `named` (that tool)."""

    mode: str
    name: str | None = None


AUTO = ToolChoice("auto")
NONE = ToolChoice("none")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """A chat message as the APIs send it, before it is folded into the protocol's roles."""

    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None


# --- parsing what the clients send -------------------------------------------------------------


def parse_tools(value: Any, where: str = "tools") -> tuple[Tool, ...]:
    """`[{"type": "function", "function": {name, description, parameters}}]` (Ollama and OpenAI)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise EdgeError(Code.INVALID_REQUEST, f"{where}: must be a list of at most {MAX_TOOLS} tools")
    tools: list[Tool] = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            raise EdgeError(Code.INVALID_REQUEST, f'{at}: must be {{"type": "function", "function": {{...}}}}')
        function = item.get("function")
        if not isinstance(function, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.function: must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.function.name: must match {TOOL_NAME_RE.pattern}")
        if any(t.name == name for t in tools):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.function.name: {name!r} is given twice")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.function.description: must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.function.parameters: must be a JSON schema object")
        tools.append(Tool(name, description, _clean_schema(parameters)))
    return tuple(tools)


def parse_tool_choice(value: Any, tools: Sequence[Tool], where: str = "tool_choice") -> ToolChoice:
    """OpenAI's `tool_choice`: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}."""
    if value is None:
        return AUTO if tools else NONE
    if value in ("none", "auto", "required"):
        if value != "none" and not tools:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: {value!r} needs `tools`")
        return ToolChoice(str(value))
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not any(t.name == name for t in tools):
            known = ", ".join(t.name for t in tools) or "none given"
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: names tool {name!r}, which is not in tools ({known})")
        return ToolChoice("named", str(name))
    raise EdgeError(
        Code.INVALID_REQUEST,
        f'{where}: must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}',
    )


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    # An object schema without "type" is still an object: the converter needs to know.
    out = dict(schema)
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


# --- (a) the prompt ----------------------------------------------------------------------------


def system_prompt(tools: Sequence[Tool], choice: ToolChoice) -> str:
    """The instructions and the tool list, added to the system prompt."""
    chosen = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in chosen],
        ensure_ascii=False,
    )
    call_form = '{"name": "<tool name>", "arguments": {<the arguments>}}'
    if choice.mode == "auto":
        how = (
            "To use a tool, reply with only this JSON object and nothing else:\n"
            f"{call_form}\n"
            "If no tool is needed, or a tool result already answers the question, reply in plain text."
        )
    else:
        how = f"Reply with only this JSON object, calling one of the tools:\n{call_form}"
    return f"You can use these tools:\n{listing}\n{how}"


def call_json(call: ToolCall) -> str:
    """A call as the model is taught to write it (also how past calls are shown to it)."""
    return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)


def chat_turns(turns: Sequence[Turn], tools: Sequence[Tool], choice: ToolChoice) -> list[dict[str, str]]:
    """The conversation as protocol messages (system/user/assistant): tool calls become the
    assistant's JSON, tool results user turns naming the tool; the tool prompt joins the system one."""
    out: list[dict[str, str]] = []
    for turn in turns:
        if turn.role == "tool":
            label = f"Result of the tool {turn.tool_name}" if turn.tool_name else "Tool result"
            out.append({"role": "user", "content": f"{label}:\n{turn.content}"})
        elif turn.role == "assistant" and turn.tool_calls:
            text = "\n".join(call_json(c) for c in turn.tool_calls)
            content = f"{turn.content}\n{text}" if turn.content.strip() else text
            out.append({"role": "assistant", "content": content})
        else:
            out.append({"role": turn.role, "content": turn.content})
    if tools and choice.mode != "none":
        prompt = system_prompt(tools, choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# --- (b) the grammar ---------------------------------------------------------------------------

# Plain text must not start with "{" (nor with white space that could hide one), so a reply is
# either a call that matches the schemas or text: never a malformed call.
PLAIN_TEXT_RULE = r"[^{ \t\r\n] .*"


def call_schema(tools: Sequence[Tool], choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema one call must match: one alternative per tool it may call."""
    chosen = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": _arguments_schema(t.parameters)},
            "required": ["name", "arguments"],
        }
        for t in chosen
    ]
    return alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}


# A string argument with no bound of its own is capped, so a small model cannot spend its whole
# max_tokens inside one string (the call would then be cut off, and be no call). docs/http.md.
MAX_ARGUMENT_CHARS = 100
# The converter's shared rules, replaced: its `char` admits raw control characters, which JSON (and
# so the parser) refuses, and its `string` is unbounded. GBNF's {m,n} keeps the bound compact.
_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_STRING_RULE = f'string ::= "\\"" char{{0,{MAX_ARGUMENT_CHARS}}} "\\"" space'


def _arguments_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    # A tool without parameters takes `{}`; the converter would otherwise allow any object.
    if (
        parameters.get("type", "object") == "object"
        and not parameters.get("properties")
        and parameters.get("additionalProperties") in (None, False)
    ):
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters


def _shared_rule(line: str) -> str:
    if line.startswith("char ::= "):
        return _CHAR_RULE
    if line.startswith("string ::= "):
        return _STRING_RULE
    return line


def call_grammar(tools: Sequence[Tool], choice: ToolChoice) -> str | None:
    """GBNF for the reply, or None when tools are off (`none`, or no tools)."""
    if not tools or choice.mode == "none":
        return None
    from llama_cpp.llama_grammar import SchemaConverter  # pure Python: the converter llama.cpp ships

    converter: Any = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        schema = converter.resolve_refs(call_schema(tools, choice), "tools")
        call_rule = converter.visit(schema, "tool-call")
    except Exception as exc:  # the converter raises plain exceptions for what it cannot express
        raise EdgeError(Code.INVALID_REQUEST, f"tools: a parameters schema cannot be enforced: {exc}") from None
    rules = "\n".join(_shared_rule(line) for line in str(converter.format_grammar()).split("\n"))
    if choice.mode == "auto":
        return f"root ::= {call_rule} | plain-text\nplain-text ::= {PLAIN_TEXT_RULE}\n{rules}\n"
    return f"root ::= {call_rule}\n{rules}\n"


# --- (c) parsing the reply ---------------------------------------------------------------------


def looks_like_call(text: str) -> bool:
    """Could this (partial) reply still become a call? Streaming holds such text back."""
    return text.lstrip().startswith("{")


def parse_call(text: str, tools: Sequence[Tool]) -> ToolCall | None:
    """The call in a reply, or None when the reply is text (or names no given tool)."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        obj, end = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        return None
    if stripped[end:].strip() or not isinstance(obj, dict):
        return None
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if isinstance(arguments, str):  # some models quote the arguments object
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not any(t.name == name for t in tools) or not isinstance(arguments, dict):
        return None
    return ToolCall(str(name), arguments)


def ollama_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def openai_tool_calls(calls: Sequence[ToolCall], ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "id": ids[i] if ids is not None else new_call_id(),
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for i, c in enumerate(calls)
    ]


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ReplySplitter:
    """Streaming with tools: text goes out as it comes, but a reply that starts like a call is held
    back until it is complete, then becomes a call (or, if it is not one, the text it was)."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = tuple(tools)
        self._held = ""
        self._streaming_text = not self.tools

    def feed(self, text: str) -> str:
        """What to send now."""
        if self._streaming_text:
            return text
        self._held += text
        if not self._held.strip():
            return ""
        if looks_like_call(self._held):
            return ""
        self._streaming_text = True
        out, self._held = self._held, ""
        return out

    def finish(self) -> tuple[str, ToolCall | None]:
        """(text still to send, the call) at the end of the reply."""
        held, self._held = self._held, ""
        if self._streaming_text:
            return held, None
        call = parse_call(held, self.tools)
        return ("", call) if call is not None else (held, None)
