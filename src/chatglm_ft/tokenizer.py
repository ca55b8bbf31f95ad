"""ChatGLM-6B tokenizer on sentencepiece alone (SPEC.md section 4)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from .errors import TokenizerError

MAX_BLANK_LENGTH = 80
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")


def _preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK_LENGTH, 1, -1):  # longest runs first
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    if "<|blank_" not in text:  # the common case: skips 79 scans per decode (the server decodes every token)
        return text
    for n in range(MAX_BLANK_LENGTH, 1, -1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


# The tokens THUDM's tokenizer (through transformers) recognises when they are typed literally in text.
LITERAL_SPECIAL_TOKENS = ("<sop>", "<eop>", "[MASK]", "<pad>", "<unk>")
_LITERAL_SPECIAL = re.compile("|".join(re.escape(t) for t in LITERAL_SPECIAL_TOKENS))


class ChatGLMTokenizer:
    """Encodes text the way THUDM's ChatGLMTokenizer does; ids are sentencepiece ids (num_image_tokens = 0).

    Text like "<eop>" or "[MASK]" typed by a user stays plain text by default (a user cannot end the
    answer or inject a mask); `parse_special = True` turns it into the control token, as THUDM's does."""

    parse_special = False

    def __init__(self, model_file: str | Path, *, num_image_tokens: int = 0):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.exists():
            raise TokenizerError(f"{model_file}: tokenizer model missing; copy ice_text.model from the ChatGLM-6B repository")
        if num_image_tokens != 0:
            raise TokenizerError(f"num_image_tokens={num_image_tokens} is not supported (ChatGLM-6B v1.1 uses 0)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({e}); re-download ice_text.model")
        self.model_file = model_file
        ids = {name: self.sp.piece_to_id(name) for name in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>")}
        if ids["[gMASK]"] == self.sp.unk_id() or ids["<sop>"] == self.sp.unk_id():
            raise TokenizerError(
                f"{model_file}: has no [gMASK]/<sop> pieces; this is not the ChatGLM-6B tokenizer (ice_text.model)"
            )
        self.mask_token_id = ids["[MASK]"]
        self.gmask_token_id = ids["[gMASK]"]
        self.bos_token_id = ids["<sop>"]
        self.eos_token_id = ids["<eop>"]
        self.pad_token_id = ids["<pad>"]
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatGLMTokenizer":
        path = Path(path)
        model_file = path / "ice_text.model"
        if not model_file.exists():
            other = [p.name for p in path.glob("*.model")] if path.is_dir() else []
            found = f" (found {', '.join(other)}: another model's tokenizer?)" if other else ""
            raise TokenizerError(f"{path}: no ice_text.model{found}; copy the ChatGLM-6B tokenizer files into the directory")
        num_image_tokens = 0
        config_file = path / "tokenizer_config.json"
        if config_file.exists():
            try:
                num_image_tokens = int(json.loads(config_file.read_text(encoding="utf-8")).get("num_image_tokens", 0))
            except (json.JSONDecodeError, ValueError, AttributeError) as e:
                raise TokenizerError(f"{config_file}: not valid JSON ({e}); restore it from the model repository")
        return cls(model_file, num_image_tokens=num_image_tokens)

    def check_model(self, vocab_size: int) -> None:
        """Fail early when tokenizer and embedding table cannot belong together."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"{self.model_file}: tokenizer has {self.vocab_size} pieces but the model only {vocab_size} embeddings;"
                " use the tokenizer that came with the checkpoint"
            )

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with special tokens the prompt ends in `[gMASK] <sop>` as the model expects."""
        ids = self._encode_parsing_special(text) if self.parse_special else list(self.sp.encode(_preprocess(text)))
        if add_special_tokens:
            ids += [self.gmask_token_id, self.bos_token_id]
        return ids

    def _encode_parsing_special(self, text: str) -> list[int]:
        """transformers (4.33) splits the text at special tokens, strips the whitespace beside them and
        encodes each remaining piece on its own (each with sentencepiece's leading "▁")."""
        ids: list[int] = []
        pieces = _LITERAL_SPECIAL.split(text)
        for i, (piece, token) in enumerate(zip(pieces, _LITERAL_SPECIAL.findall(text) + [None])):
            piece = piece.lstrip() if i > 0 else piece
            piece = piece.rstrip() if token is not None else piece
            if piece:
                ids += self.sp.encode(_preprocess(piece))
            if token is not None:
                ids.append(self.sp.piece_to_id(token))
        return ids

    def tokenize(self, text: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.sp.encode(_preprocess(text))]

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        if isinstance(texts, str):
            texts = [texts]
        return {"input_ids": self.batch_encode(list(texts), add_special_tokens=add_special_tokens)}

    def batch_encode(self, texts: Sequence[str], *, add_special_tokens: bool = True, pad: bool = True) -> list[list[int]]:
        """Encode several texts; with pad=True rows are left-padded with the pad id to one length."""
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return left_pad(rows, self.pad_token_id) if pad else rows

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ids; pad ids and ids beyond the tokenizer (unused embedding rows) are dropped."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.pad_token_id]
        if skip_special_tokens:
            keep = [i for i in keep if not self.sp.is_control(i)]
        if not keep:
            return ""
        return _postprocess(self.sp.decode(keep))

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [[pad_id] * (width - len(r)) + list(r) for r in rows]


class StreamDecoder:
    """Turns a growing list of ids into text deltas without ever emitting half a character, at a cost
    per token that does not grow with the answer.

    Byte-fallback pieces make a multi-byte character arrive over several tokens; until it is complete,
    sentencepiece decodes it as U+FFFD, which we hold back. Only a window is decoded (the prefix/read
    offsets of vLLM's detokenizer): the text of ids[start:] minus that of ids[start:read] is what the
    new ids add. A window starts on text (so the first piece's leading-space rule applies to both
    decodes alike), a half-done character holds the window open, and anything unexpected falls back
    to a full decode.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] are in self.text
        self.text = ""  # what has been emitted so far

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        decode = self.tokenizer.decode
        start = self.prefix
        before = decode(self.ids[start:self.read])
        while start > 0 and not before.strip():
            start -= 1
            before = decode(self.ids[start:self.read])
        after = decode(self.ids[start:])
        if not final and after.endswith("\ufffd"):
            return ""  # a multi-byte character is still arriving
        if after.startswith(before):
            delta = after[len(before):]
        else:
            full = decode(self.ids)
            full = full if final else full.rstrip("\ufffd")
            if not full.startswith(self.text):
                return ""  # not prefix-stable around a held-back character: wait
            delta = full[len(self.text):]
        if not delta and not final:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
