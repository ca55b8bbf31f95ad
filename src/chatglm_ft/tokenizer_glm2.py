"""ChatGLM2-6B / ChatGLM3-6B tokenizer on sentencepiece alone (SPEC.md II.4).

Both models share one `tokenizer.model` (64,789 pieces, byte fallback, identity normalisation). The Python
tokenizer puts special ids after the pieces: `[MASK] [gMASK] [sMASK] sop eop` = 64789..64793 and, for ChatGLM3,
the role tokens `<|system|> <|user|> <|assistant|> <|observation|>` = 64794..64797. Unlike ChatGLM-6B the
prompt prefix `[gMASK] sop` goes in FRONT of the ids, and batches are padded on the left with id 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from .errors import TokenizerError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")


class ChatGLM2Tokenizer:
    """Encodes and decodes exactly like THUDM's ChatGLM2-6B (`roles=False`) or ChatGLM3-6B (`roles=True`) tokenizer.

    Attribute names follow the ChatGLM-6B tokenizer so generation, data and the server need not care which
    one they hold; `sop_token_id` is the `sop` id (ChatGLM-6B called its `<sop>` bos).
    """

    family: str

    def __init__(self, model_file: str | Path, *, roles: bool):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.exists():
            raise TokenizerError(f"{model_file}: tokenizer model missing; copy tokenizer.model from the model repository")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({e}); re-download tokenizer.model")
        self.model_file = model_file
        self.family = "chatglm3" if roles else "chatglm2"
        self.num_pieces = self.sp.get_piece_size()
        if self.sp.piece_to_id("<0x0A>") == self.sp.unk_id() or self.num_pieces > 65000:
            raise TokenizerError(f"{model_file}: not the ChatGLM2/3 tokenizer (no byte pieces); use the checkpoint's own files")
        names = SPECIAL_TOKENS + (ROLE_TOKENS if roles else ())
        self.special_tokens = {name: self.num_pieces + i for i, name in enumerate(names)}  # name -> id
        self.special_names = {i: name for name, i in self.special_tokens.items()}  # id -> name
        self.vocab_size = self.num_pieces + len(names)  # 64794 (v2) / 64798 (v3)
        self.mask_token_id = self.special_tokens["[MASK]"]
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.sop_token_id = self.special_tokens["sop"]
        self.eop_token_id = self.special_tokens["eop"]
        self.bos_token_id = self.sp.bos_id()  # 1
        self.eos_token_id = self.sp.eos_id()  # 2
        self.pad_token_id = self.sp.unk_id()  # 0: the original pads with <unk>
        self.unk_token_id = self.sp.unk_id()
        self.prefix_tokens = [self.gmask_token_id, self.sop_token_id]
        self.padding_side = "left"
        self.roles = ROLES if roles else ()

    @classmethod
    def from_dir(cls, path: str | Path, *, roles: bool | None = None) -> "ChatGLM2Tokenizer":
        """The tokenizer of a checkpoint directory; `roles=None` reads which generation it is from its files."""
        path = Path(path)
        if roles is None:
            from .tokenizers import detect_family

            roles = detect_family(path) == "chatglm3"
        return cls(path / "tokenizer.model", roles=roles)

    def check_model(self, vocab_size: int) -> None:
        """Fail early when tokenizer and embedding table cannot belong together."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"{self.model_file}: tokenizer has {self.vocab_size} ids but the model only {vocab_size} embeddings;"
                " use the tokenizer that came with the checkpoint"
            )

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with special tokens `[gMASK] sop` come first. Special-token strings in text are plain text."""
        ids = list(self.sp.encode(text))
        return self.prefix_tokens + ids if add_special_tokens else ids

    def encode_pair(self, text: str, text_pair: str) -> list[int]:
        """The original's pair layout: `[gMASK] sop a b </s>`."""
        return self.encode(text) + self.encode(text_pair, add_special_tokens=False) + [self.eos_token_id]

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def role_id(self, role: str) -> int:
        if role not in self.roles:
            raise TokenizerError(
                f"unknown role {role!r}; ChatGLM3 knows {', '.join(self.roles)}" if self.roles
                else "roles are a ChatGLM3 feature; this is the ChatGLM2 tokenizer"
            )
        return self.special_tokens[f"<|{role}|>"]

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """`<|role|>` + encode(metadata + "\\n") + encode(message); each encode adds its own dummy `▁`."""
        ids = [self.role_id(role)] + self.encode(f"{metadata}\n", add_special_tokens=False)
        return ids + (self.encode(message, add_special_tokens=False) if message else [])

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        """Left-padded batch with attention_mask (0 on pads) and position_ids (0 on pads), as the original returns."""
        if isinstance(texts, str):
            texts = [texts]
        return self.pad([self.encode(t, add_special_tokens=add_special_tokens) for t in texts])

    def batch_encode(self, texts: Sequence[str], *, add_special_tokens: bool = True, pad: bool = True) -> list[list[int]]:
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return self.pad(rows)["input_ids"] if pad else rows

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, list[list[int]]]:
        width = max((len(r) for r in rows), default=0)
        input_ids, attention_mask, position_ids = [], [], []
        for row in rows:
            pad = width - len(row)
            input_ids.append([self.pad_token_id] * pad + list(row))
            attention_mask.append([0] * pad + [1] * len(row))
            position_ids.append([0] * pad + list(range(len(row))))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    # -- decoding -------------------------------------------------------------------------------
    def id_to_token(self, token_id: int) -> str:
        """The piece, the special token's name, or "" for ids 0/1/2 and ids beyond the tokenizer."""
        token_id = int(token_id)
        if token_id in self.special_names:
            return self.special_names[token_id]
        if token_id in (self.pad_token_id, self.bos_token_id, self.eos_token_id) or not 0 <= token_id < self.num_pieces:
            return ""
        return self.sp.id_to_piece(token_id)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ids (SPEC II.4.3). ChatGLM2 drops special ids; ChatGLM3 writes their names (`<|assistant|>`),
        which its chat post-processing splits on. Ids 0/1/2 and unused embedding rows give nothing.
        `skip_special_tokens` is accepted for compatibility: as in the original it changes nothing here."""
        text, run = "", []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in self.special_names:
                if self.roles:  # ChatGLM3: the name is part of the text
                    text = self._flush(text, run) + self.special_names[token_id]
                    run = []
            elif 0 <= token_id < self.num_pieces and token_id not in (self.pad_token_id, self.bos_token_id,
                                                                         self.eos_token_id):
                run.append(token_id)
        return self._flush(text, run)

    def _flush(self, text: str, run: list[int]) -> str:
        if not run:
            return text
        piece_text = self.sp.decode(run)  # drops the leading space of the first `▁` piece
        if text and self.sp.id_to_piece(run[0]).startswith("▁"):
            piece_text = " " + piece_text  # only the space at the very start of the text is dropped
        return text + piece_text
