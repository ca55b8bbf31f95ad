"""ChatGLM3-6B's chat format (SPEC.md II.5.2): role messages, a system prompt, tools and observation turns, the
response post-processing with tool calls, and the mapping to and from OpenAI Chat Completions messages.

A conversation is a list of messages `{"role": system|user|assistant|observation, "content": str}`; an assistant
message may carry `"metadata"` (a tool name) and the first, system, message may carry `"tools"`. The model
answers `<|assistant|>` + metadata line + content, several times over when it calls a tool in mid-answer; a tool
call is the metadata line `name` and the content "```python\\ntool_call(k='v', ...)\\n```".
"""
from __future__ import annotations

import ast
import copy
import json
import uuid
from typing import Any, Sequence

from .chat_format import ChatFormat
from .errors import ChatGLMError

Message = dict[str, Any]
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
DATE_PLACEHOLDER = ("[[训练时间]]", "2023年")


# -- prompt -------------------------------------------------------------------------------------------
def message_content(message: Message) -> str:
    """The text a message contributes; a system message's tools follow it as indented JSON, as the original writes."""
    content = message.get("content") or ""
    if message.get("role") == "system" and "tools" in message:
        content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return content


def build_chat_input(tokenizer, query: str, history: Sequence[Message] | None = None, role: str = "user") -> list[int]:
    """`[gMASK] sop`, each history message, the query as `role`, then `<|assistant|>` (the original's build_chat_input)."""
    ids = list(tokenizer.prefix_tokens)
    for item in history or []:
        ids += tokenizer.build_single_message(item["role"], item.get("metadata", ""), message_content(item))
    ids += tokenizer.build_single_message(role, "", query)
    return ids + [tokenizer.role_id("assistant")]


# -- response -----------------------------------------------------------------------------------------
def parse_tool_call(code: str) -> dict[str, Any] | None:
    """Keyword arguments of `tool_call(k=v, ...)` with literal values, or None if the text is not such a call.
    The original evaluates the text as Python; only literals are accepted here, so model output runs no code."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
            and not call.args and all(k.arg is not None for k in call.keywords)):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError):
        return None


def process_response(output: str, history: Sequence[Message]) -> tuple[Any, list[Message]]:
    """The original's post-processing: one assistant message per `<|assistant|>` segment of `output`; the response
    of the last segment is its text, `{"name", "parameters"}` for a tool call when the conversation declares
    tools, or `{"name", "content"}` for other named output (e.g. code for an interpreter)."""
    history = copy.deepcopy(list(history))
    has_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    response: Any = ""
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            response = content.replace(*DATE_PLACEHOLDER)
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        parameters = parse_tool_call("\n".join(content.split("\n")[1:-1])) if has_tools else None
        if parameters is not None:
            response = {"name": metadata.strip(), "parameters": parameters}
        else:  # no tools declared, or not a call the original could evaluate: hand over the text
            response = {"name": metadata.strip(), "content": content}
    return response, history


def visible_text(output: str) -> str | None:
    """What a stream may show of raw output so far: the last segment's text, or None while it is (or may still
    become) a tool call, i.e. until its first line is known to be empty."""
    segment = output.rsplit("<|assistant|>", 1)[-1]
    if "\n" not in segment:
        return None if segment.strip() else ""
    metadata, content = segment.split("\n", 1)
    if metadata.strip():
        return None
    return content.strip().replace(*DATE_PLACEHOLDER)


class ChatGLM3Format(ChatFormat):
    family = "chatglm3"
    display_name = "ChatGLM3-6B"
    max_length = 8192
    top_p = 0.8
    temperature = 0.8
    roles = ("observation",)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        # the original stops at </s>, at <|user|> (the model hands the turn back) and at <|observation|>
        # (it waits for a tool's result)
        return (self.tokenizer.eos_token_id, self.tokenizer.role_id("user"), self.tokenizer.role_id("observation"))

    def new_history(self, *, system: str | None = None, tools: list | None = None) -> list[Message]:
        if not system and not tools:
            return []
        message: Message = {"role": "system", "content": system or TOOL_SYSTEM_PROMPT}
        if tools:
            message["tools"] = list(tools)
        return [message]

    def prompt_text(self, query: str, history: Sequence | None = None) -> str:
        raise ChatGLMError("ChatGLM3-6B prompts are token ids with role tokens, not text; use prompt_ids()")

    def prompt_ids(self, query: str, history: Sequence[Message] | None = None, *, role: str = "user") -> list[int]:
        self._check_role(role)
        return build_chat_input(self.tokenizer, query, history, role)

    def output_text(self, token_ids: Sequence[int], text: str, finish_reason: str | None) -> str:
        # The original always drops the last generated id: the stop token, or a real token when the answer
        # reached max_length. Our generation already leaves the stop token out.
        if finish_reason == "length" and token_ids:
            return self.tokenizer.decode(list(token_ids)[:-1])
        return text

    def process_response(self, output: str, query: str, history: Sequence[Message] | None = None, *,
                         role: str = "user") -> tuple[Any, list[Message]]:
        return process_response(output, list(history or []) + [{"role": role, "content": query}])

    def clean(self, output: str) -> str:
        return visible_text(output) or ""

    def history_pairs(self, history: Sequence[Message] | None) -> list[tuple[str, str]]:
        pairs, query = [], None
        for message in history or []:
            if message["role"] in ("user", "observation"):
                query = message["content"]
            elif message["role"] == "assistant" and query is not None:
                pairs.append((query, message["content"]))
                query = None
        return pairs


# -- OpenAI Chat Completions --------------------------------------------------------------------------
def tool_call_code(arguments: dict[str, Any]) -> str:
    """The assistant content ChatGLM3 writes for a call: "```python\\ntool_call(k='v')\\n```"."""
    args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"```python\ntool_call({args})\n```"


def _openai_tools(tools: Sequence[dict] | None) -> list[dict]:
    """OpenAI `tools` ([{"type": "function", "function": {...}}]) -> ChatGLM3's list of function descriptions."""
    functions = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatGLMError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        functions.append(function)
    return functions


def openai_to_chat(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> tuple[str, str, list[Message]]:
    """OpenAI request messages (+ tools) -> (query, role, history) for `ChatGLM3Format.prompt_ids`.

    `tools` become the system message with tools (after the request's own system text, or the original's tool
    prompt); an assistant message's `tool_calls` become tool-call messages; `role: tool` messages become
    observation turns. The last message (user or tool) is the query."""
    functions = _openai_tools(tools)
    history: list[Message] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        content = content or ""
        if role == "system":
            history.append({"role": "system", "content": content})
        elif role == "user":
            history.append({"role": "user", "content": content})
        elif role in ("tool", "function", "observation"):
            history.append({"role": "observation", "content": content})
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if content or not calls:
                history.append({"role": "assistant", "metadata": "", "content": content})
            for call in calls:
                function = call.get("function", {}) if isinstance(call, dict) else {}
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except json.JSONDecodeError as e:
                    raise ChatGLMError(f"messages[{i}].tool_calls: arguments are not JSON ({e})")
                if not isinstance(arguments, dict) or not isinstance(function.get("name"), str):
                    raise ChatGLMError(f"messages[{i}].tool_calls: need a function name and a JSON object of arguments")
                history.append({"role": "assistant", "metadata": function["name"], "content": tool_call_code(arguments)})
        else:
            raise ChatGLMError(f"messages[{i}]: unknown role {role!r}; use system, user, assistant or tool")
    if functions:
        if history and history[0]["role"] == "system":
            history[0]["tools"] = functions
        else:
            history.insert(0, {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": functions})
    if not history or history[-1]["role"] not in ("user", "observation"):
        raise ChatGLMError("the last message must be from the user or a tool result")
    last = history.pop()
    return last["content"], last["role"], history


def openai_message(response: Any, *, call_id: str | None = None) -> tuple[dict, str]:
    """(assistant message, finish_reason) in the Chat Completions format for a processed ChatGLM3 response."""
    if isinstance(response, dict) and "parameters" in response:
        call = {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": response["name"],
                             "arguments": json.dumps(response["parameters"], ensure_ascii=False)}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    if isinstance(response, dict):  # named output without declared tools: its text
        return {"role": "assistant", "content": response["content"]}, "stop"
    return {"role": "assistant", "content": response}, "stop"
