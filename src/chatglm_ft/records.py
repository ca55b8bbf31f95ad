"""Data files -> normalised `Record`s (the text half of the data pipeline; `data.py` does the tokens).

One reader for every supported format: Alpaca (`instruction`/`input`/`output`), ChatGLM-Tuning
(`context`/`target`), HC3 (`question`/`human_answers`), chat with history (`prompt`/`response`/`history`)
and message lists (`messages`/`conversations` with `role`/`content` or `from`/`value`). A file is a
JSON array or JSONL; its format is detected from the fields of its first record unless given.
User data never raises a traceback: a bad row is reported as `file:line` with a reason, skipped or
fatal by option; a file that cannot be parsed at all raises DataError.
"""
from __future__ import annotations

import bisect
import copy
import glob
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ChatGLMError, DataError
from .prompt import alpaca_prompt, chat_prompt

FORMATS = ("alpaca", "chatglm-tuning", "hc3", "chat", "messages")
TEMPLATES = ("chatglm", "alpaca")
# Canonical field names that `columns` may map from a file's own names.
FIELDS = ("instruction", "input", "output", "context", "target", "question", "human_answers", "chatgpt_answers",
          "prompt", "response", "history", "messages", "conversations", "role", "content")
DATA_SUFFIXES = (".json", ".jsonl")
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "bot", "model", "chatgpt")
OBSERVATION_ROLES = ("observation", "tool", "function")  # a tool's result, answered by the assistant


@dataclass
class Record:
    """One training/evaluation example: a user turn, its target, and the conversation before it."""

    prompt: str  # the user turn; for Alpaca `instruction` + "\n" + `input` (what the chatglm template shows)
    response: str  # the target
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (query, response) turns
    references: list[str] = field(default_factory=list)  # all acceptable answers; [response] when not given
    source: str = ""  # "file:line" (JSON arrays: "file:line [index]") for messages
    instruction: str = ""  # Alpaca fields, kept for the alpaca template
    input: str = ""
    templated: bool = False  # prompt is already a rendered template (ChatGLM-Tuning `context`): used verbatim
    # Message rows only: the conversation through this record's response as role messages ({role, content},
    # system and tool/observation turns kept, tools on the system message), for formats with roles (ChatGLM3).
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.references:
            self.references = [self.response]

    def key(self) -> tuple:
        """Identity for de-duplication: everything except where the record came from."""
        return (self.prompt, self.response, tuple(self.history), tuple(self.references), self.instruction,
                self.input, self.templated, json.dumps(self.messages, ensure_ascii=False, sort_keys=True))


@dataclass
class DataReport:
    """What load_records read, kept and dropped; `summary()` is what the CLI prints."""

    files: list[str]
    total_rows: int = 0
    kept: int = 0
    duplicates: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format

    def summary(self, max_bad_rows: int = 10) -> str:
        formats = Counter(self.formats.values())
        kinds = ", ".join(f"{name} x{n}" for name, n in formats.items())
        lines = [
            f"{len(self.files)} file(s) ({kinds}): {self.total_rows:,} rows -> {self.kept:,} records;"
            f" {self.duplicates:,} exact duplicates removed; {len(self.bad_rows):,} bad rows skipped"
        ]
        if self.bad_rows:
            reasons = Counter(_reason_kind(reason) for _, reason in self.bad_rows)
            lines.append("  bad rows: " + "; ".join(f"{n} x {kind}" for kind, n in reasons.most_common()))
            lines += [f"  {source}: {reason}" for source, reason in self.bad_rows[:max_bad_rows]]
            if len(self.bad_rows) > max_bad_rows:
                lines.append(f"  ... and {len(self.bad_rows) - max_bad_rows:,} more")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(": ")[0]


class BadRow(Exception):
    """Internal: one row cannot become a record (the message is the reason)."""


# -- entry point ------------------------------------------------------------------------------------
def load_records(
    paths: str | Path | Sequence[str | Path],
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    on_bad_row: str = "skip",
    last_turn_only: bool = False,
) -> tuple[list[Record], DataReport]:
    """Read files, directories (their *.json/*.jsonl) or globs into de-duplicated Records.

    `columns` maps canonical field names to the file's names, e.g. {"prompt": "question", "response": "answer"}.
    Every assistant turn of a multi-turn row becomes a Record (earlier turns as history) unless
    `last_turn_only`. Bad rows are reported in the DataReport and skipped, or raise DataError with
    on_bad_row="error".
    """
    format = format.replace("_", "-")
    if format != "auto" and format not in FORMATS:
        raise ChatGLMError(f"unknown data format {format!r}; choose auto or one of {', '.join(FORMATS)}")
    if on_bad_row not in ("skip", "error"):
        raise ChatGLMError(f"on_bad_row must be 'skip' or 'error', not {on_bad_row!r}")
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ChatGLMError(f"columns: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")

    files = expand_paths(paths)
    report = DataReport(files=[str(f) for f in files])
    records: list[Record] = []
    seen: set[tuple] = set()
    for path in files:
        rows = list(_read_rows(path))
        report.total_rows += len(rows)
        file_format = format if format != "auto" else _detect_format(path, rows, columns)
        report.formats[str(path)] = file_format
        for source, row in rows:
            try:
                if isinstance(row, BadRow):
                    raise row
                new = _convert(_rename(row, columns), file_format, source, last_turn_only=last_turn_only)
            except BadRow as e:
                if on_bad_row == "error":
                    raise DataError(f"{source}: {e} (fix the row, or skip bad rows with --on-bad-row skip)") from None
                report.bad_rows.append((source, str(e)))
                continue
            for record in new:
                key = record.key()
                if key in seen:
                    report.duplicates += 1
                    continue
                seen.add(key)
                records.append(record)
    report.kept = len(records)
    if not records:
        reasons = Counter(_reason_kind(r) for _, r in report.bad_rows).most_common(3)
        why = "; ".join(f"{n} x {kind}" for kind, n in reasons) or "no rows"
        raise DataError(
            f"no usable records in {', '.join(report.files)} ({report.total_rows} rows: {why});"
            " check the format and the `columns` mapping"
        )
    return records, report


def expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files, directories (their *.json / *.jsonl, sorted) and globs -> a list of files, each once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"{path}: directory holds no *.json or *.jsonl files")
        elif path.is_file():
            found = [path]
        elif any(c in str(raw) for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
            found = [m for m in matches if m.is_file()]
            if not found:
                raise DataError(f"{raw}: the pattern matches no files")
        else:
            raise DataError(f"{path}: no such file or directory")
        files += found
    unique = {f.resolve(): f for f in reversed(files)}  # keep the first mention of a file
    return [f for f in files if unique.get(f.resolve()) is f]


# -- reading files ----------------------------------------------------------------------------------
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, parsed value or BadRow) per row of a JSON array or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    start = _WHITESPACE.match(text).end()
    if text[start:start + 1] == "[":
        yield from _read_json_array(path, text, start)
    else:
        yield from _read_jsonl(path, text)


def _read_json_array(path: Path, text: str, pos: int) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level array with the line each starts on (json.load alone loses positions)."""
    newlines = [m.start() for m in re.finditer("\n", text)]
    decoder = json.JSONDecoder()

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    def fail(offset: int, what: str) -> DataError:
        # A syntax error in an array leaves everything after it unknowable: the file is unusable.
        return DataError(
            f"{path}:{line_of(offset)}: not valid JSON ({what}); fix the file (or use JSONL, one record per line)"
        )

    pos = _WHITESPACE.match(text, pos + 1).end()
    if text[pos:pos + 1] == "]":
        return
    index = 0
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        except RecursionError:
            raise fail(pos, "nested too deeply") from None
        yield f"{path}:{line_of(pos)} [{index}]", _text_problem(text, pos, end, value) or value
        pos = end if text[end:end + 1] in ",]" else _WHITESPACE.match(text, end).end()  # fast path: no whitespace
        separator = text[pos:pos + 1]
        if separator == "]":
            rest = _WHITESPACE.match(text, pos + 1).end()
            if rest != len(text):
                raise fail(rest, "extra data after the array")
            return
        if separator != ",":
            raise fail(pos, "expected ',' or ']' after an array element")
        pos = _WHITESPACE.match(text, pos + 1).end()
        index += 1


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    lines = text.splitlines()
    if lines and lines[0].lstrip().startswith("{") and _is_one_object(text):
        raise DataError(
            f"{path}: holds a single JSON object, not records;"
            " expected a JSON array of records or JSONL (one object per line)"
        )
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield source, BadRow(f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            yield source, BadRow("nested too deeply to be a record")
            continue
        yield source, _text_problem(line, 0, len(line), value) or value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _text_problem(text: str, start: int, end: int, value: Any) -> BadRow | None:
    """A lone surrogate escape (\\ud800 without its pair) decodes to no character: no tokenizer can encode it."""
    if not _SURROGATE_ESCAPE.search(text, start, end):
        return None  # the common case, without re-reading the row
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return BadRow("holds a lone surrogate escape (\\ud800-\\udfff without its pair), which is not text")
    return None


def _is_one_object(text: str) -> bool:
    """A pretty-printed single object: its first line alone does not parse, the whole text does."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        json.loads(first)
        return False
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _rename(row: Any, columns: dict[str, str]) -> Any:
    """Apply the `columns` mapping (canonical -> file name); role/content also inside message lists."""
    if not isinstance(row, dict) or not columns:
        return row
    sources = set(columns.values())
    renamed = {k: v for k, v in row.items() if k not in sources}
    for canonical, name in columns.items():
        if name in row:
            renamed[canonical] = row[name]
    for key in ("messages", "conversations"):
        if isinstance(renamed.get(key), list) and ("role" in columns or "content" in columns):
            renamed[key] = [_rename(m, {k: v for k, v in columns.items() if k in ("role", "content")})
                            for m in renamed[key]]
    return renamed


def _detect_format(path: Path, rows: list[tuple[str, Any]], columns: dict[str, str]) -> str:
    first = next((_rename(row, columns) for _, row in rows if isinstance(row, dict)), None)
    if first is None:
        return "chat"  # no object rows at all: every row is reported bad, the format is irrelevant
    keys = set(first)
    if keys & {"messages", "conversations"}:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if "human_answers" in keys:
        return "hc3"
    if keys & {"context", "target"}:
        return "chatglm-tuning"
    if keys & {"prompt", "response"}:
        return "chat"
    raise DataError(
        f"{path}: cannot tell the data format from the fields of the first record ({', '.join(sorted(keys))});"
        f" formats: alpaca (instruction/input/output), chatglm-tuning (context/target), hc3 (question/human_answers),"
        f" chat (prompt/response/history), messages (messages or conversations); map your fields with columns,"
        f" e.g. {{\"prompt\": \"question\", \"response\": \"answer\"}}"
    )


# -- rows -> records --------------------------------------------------------------------------------
def _text(row: dict, name: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value.__class__ is str:  # the common case first: this runs for every field of every row
        return value
    if value is None:
        if required:
            raise BadRow(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"wrong type: field '{name}' must be a string, not {type(value).__name__}")
    return value


def _target(row: dict, name: str) -> str:
    value = _text(row, name)
    if not value.strip():
        raise BadRow(f"empty target '{name}'")
    return value


def _history(row: dict) -> list[tuple[str, str]]:
    value = row.get("history")
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRow(
            f"wrong type: field 'history' must be a list of [query, response] pairs, not {type(value).__name__}"
        )
    turns = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRow(f"wrong type: history[{i}] must be a [query, response] pair of strings")
        turns.append((turn[0], turn[1]))
    return turns


def _turn_records(turns: list[tuple[str, str]], source: str, *, last_turn_only: bool) -> list[Record]:
    """A conversation -> one Record per assistant turn (the earlier turns as history)."""
    for i, (query, response) in enumerate(turns):
        if not response.strip():
            raise BadRow(f"empty target (assistant turn {i})")
        if not query.strip():
            raise BadRow(f"empty prompt (user turn {i})")
    chosen = range(len(turns))[-1:] if last_turn_only else range(len(turns))
    return [Record(prompt=turns[i][0], response=turns[i][1], history=turns[:i], source=source) for i in chosen]


def _convert(row: Any, format: str, source: str, *, last_turn_only: bool) -> list[Record]:
    if not isinstance(row, dict):
        raise BadRow(f"wrong type: a record must be a JSON object, not {type(row).__name__}")
    if format == "alpaca":
        instruction, input = _text(row, "instruction"), _text(row, "input", required=False)
        output = _target(row, "output")
        prompt = f"{instruction}\n{input}" if instruction and input else instruction or input
        if not prompt.strip():
            raise BadRow("empty prompt: 'instruction' and 'input' are both empty")
        history = _history(row)
        earlier = _turn_records(history, source, last_turn_only=False) if history else []  # validates them too
        final = Record(prompt=prompt, response=output, history=history, source=source, instruction=instruction,
                       input=input)
        return [final] if last_turn_only else earlier + [final]
    if format == "chatglm-tuning":
        context, target = _text(row, "context"), _target(row, "target")
        return [Record(prompt=context, response=target, source=source, templated=True)]
    if format == "hc3":
        question = _text(row, "question")
        answers = row.get("human_answers")
        if answers is None:
            raise BadRow("missing field 'human_answers'")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise BadRow("wrong type: field 'human_answers' must be a list of strings")
        answers = [a for a in answers if a.strip()]
        if not answers:
            raise BadRow("empty target 'human_answers'")
        if not question.strip():
            raise BadRow("empty prompt 'question'")
        # The first human answer is the training target; all of them are references for evaluation.
        return [Record(prompt=question, response=answers[0], references=answers, source=source)]
    if format == "chat":
        prompt, response = _text(row, "prompt"), _target(row, "response")
        turns = _history(row) + [(prompt, response)]
        return _turn_records(turns, source, last_turn_only=last_turn_only)
    if format == "messages":
        turns, messages = _message_turns(row)
        records = _turn_records(turns, source, last_turn_only=last_turn_only)
        for record in records:  # each record's conversation ends with its own answer
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            record.messages = copy.deepcopy(messages[:answers[len(record.history)] + 1])
        return records
    raise AssertionError(format)


def _message_turns(row: dict) -> tuple[list[tuple[str, str]], list[dict]]:
    """`messages` ({role, content}) or ShareGPT `conversations` ({from, value}) -> (query, response) pairs and the
    role messages (ChatGLM3 roles; tool results are observation turns, a row's `tools` go on the system message)."""
    name = "messages" if "messages" in row else "conversations"
    messages = row.get(name)
    if messages is None:
        raise BadRow("missing field 'messages' (or 'conversations')")
    if not isinstance(messages, list):
        raise BadRow(f"wrong type: field '{name}' must be a list of messages, not {type(messages).__name__}")
    system, turns, query, role_messages = "", [], None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRow(f"wrong type: {name}[{i}] must be an object with role and content")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRow(f"wrong type: {name}[{i}] needs string 'role' and 'content' (or 'from' and 'value')")
        role = role.lower()
        if role == "system" and not turns and query is None:
            system += content  # ChatGLM-6B has no system turn: it is put in front of the first query
            role_messages.append({"role": "system", "content": content})
        elif role in USER_ROLES + OBSERVATION_ROLES and query is None:
            query = f"{system}\n{content}" if system and not turns else content
            role_messages.append({"role": "observation" if role in OBSERVATION_ROLES else "user", "content": content})
        elif role in ASSISTANT_ROLES and query is not None:
            turns.append((query, content))
            query = None
            metadata = message.get("metadata", "")
            role_messages.append({"role": "assistant", "content": content,
                                  **({"metadata": metadata} if isinstance(metadata, str) and metadata else {})})
        else:
            raise BadRow(f"unexpected role '{role}' at {name}[{i}] (turns must alternate user, assistant)")
    if not turns:
        raise BadRow(f"empty target: no assistant turn in '{name}'")
    tools = row.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRow(f"wrong type: field 'tools' must be a list of function descriptions, not {type(tools).__name__}")
        if role_messages[0]["role"] != "system":
            from .chat_glm3 import TOOL_SYSTEM_PROMPT

            role_messages.insert(0, {"role": "system", "content": TOOL_SYSTEM_PROMPT})
        role_messages[0]["tools"] = tools
    return turns, role_messages  # a trailing user message has no answer to learn and is left out


# -- templates --------------------------------------------------------------------------------------
def build_prompt(record: Record, template: str) -> str:
    """The model's input text for a record: `chatglm` (chat rounds, SPEC 5) or `alpaca` (SPEC 6)."""
    check_template(template)
    if record.templated:
        return record.prompt
    if template == "chatglm":
        return chat_prompt(record.prompt, record.history)
    if record.instruction or record.input:
        instruction, input = record.instruction, record.input
    else:  # not Alpaca data: the user turn is the instruction
        instruction, input = record.prompt, ""
    # Earlier turns in the same Instruction/Answer form, so history is not silently dropped.
    rounds = "".join(f"{alpaca_prompt(q)}{a}\n" for q, a in record.history)
    return rounds + alpaca_prompt(instruction, input)


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ChatGLMError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
