from chatglm_ft.tokenizer import StreamDecoder


def test_golden_cases_exact(tokenizer, golden):
    for case in golden["tokenizer"]:
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert tokenizer.encode(case["text"]) == case["ids_with_special"], case["text"]
        assert tokenizer.tokenize(case["text"]) == case["tokens"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["decoded"], case["text"]


def test_special_ids(tokenizer):
    assert (tokenizer.mask_token_id, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (130000, 130001, 130004, 130005, 3)


def test_batch_encode_left_pads(tokenizer):
    rows = tokenizer.batch_encode(["你好", "Give three tips for staying healthy."])
    assert len(rows[0]) == len(rows[1])
    assert rows[0][: len(rows[1]) - 4] == [3] * (len(rows[1]) - 4)
    assert rows[0][-4:] == tokenizer.encode("你好")


def test_decode_skips_pad_special_and_unused_ids(tokenizer):
    ids = tokenizer.encode("你好")
    assert tokenizer.decode([3, 3] + ids + [130005, 130400]) == "你好"


def test_stream_decoder_never_emits_broken_characters(tokenizer):
    text = "混合 English 和中文 😀 ©®\n  end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_stream_decoder_holds_partial_byte_fallback(tokenizer):
    # A rare character that sentencepiece spells with byte-fallback pieces, one byte per token.
    text = "𠀋"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.id_to_token(i) for i in ids]
    decoder = StreamDecoder(tokenizer)
    out = [decoder.push(i) for i in ids]
    if any(p.startswith("<0x") for p in pieces):
        assert out[:-1] == [""] * (len(out) - 1) or all("\ufffd" not in o for o in out)
    assert "".join(out) + decoder.flush() == tokenizer.decode(ids)


def test_literal_special_token_text_stays_text_unless_parsing_is_asked_for(golden_dir):
    from chatglm_ft import load
    from chatglm_ft.tokenizer import ChatGLMTokenizer

    plain = ChatGLMTokenizer.from_dir(golden_dir)
    text = "a <eop> b[MASK]你好<pad><unk><sop> [gMASK]"
    assert 130005 not in plain.encode(text) and plain.decode(plain.encode(text, add_special_tokens=False)) == text
    parsing = ChatGLMTokenizer.from_dir(golden_dir)
    parsing.parse_special = True
    ids = parsing.encode(text, add_special_tokens=False)
    # THUDM's tokenizer: each special is its control id, the whitespace beside it is stripped, the text
    # between is encoded on its own; [gMASK] is no special token of the HF tokenizer and stays text
    assert ids == (plain.encode("a", False) + [130005] + plain.encode("b", False) + [130000] + plain.encode("你好", False)
                   + [3, 0, 130004] + plain.encode("[gMASK]", False))
    assert parsing.encode("no specials here") == plain.encode("no specials here")
    _, loaded = load(golden_dir, device="cpu", parse_special=True)
    assert loaded.encode(text) == ids + [130001, 130004]
