"""ChatGLM2/3 tokenizer against the goldens of THUDM's tokenizers (SPEC II.4)."""
import json
import shutil

import pytest

from chatglm_ft.errors import TokenizerError
from chatglm_ft.tokenizer import ChatGLMTokenizer
from chatglm_ft.tokenizer_glm2 import ChatGLM2Tokenizer
from chatglm_ft.tokenizers import detect_family, load_tokenizer


@pytest.fixture(scope="module", params=["2", "3"])
def case(request, golden2_dir, golden3_dir, golden2, golden3):
    """(tokenizer, golden) for ChatGLM2 and ChatGLM3."""
    directory, golden = (golden2_dir, golden2) if request.param == "2" else (golden3_dir, golden3)
    return load_tokenizer(directory), golden


def test_family_read_from_files(golden_dir, golden2_dir, golden3_dir, tmp_path):
    assert detect_family(golden_dir) == "chatglm"
    assert detect_family(golden2_dir) == "chatglm2"
    assert detect_family(golden3_dir) == "chatglm3"
    assert isinstance(load_tokenizer(golden_dir), ChatGLMTokenizer)
    # the folder name plays no part: a v3 directory named like v2 is still v3
    renamed = tmp_path / "chatglm2-6b"
    renamed.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(golden3_dir / name, renamed / name)
    assert load_tokenizer(renamed).family == "chatglm3"
    # THUDM's tokenizer code beside the model wins over the config's model id
    (renamed / "tokenization_chatglm.py").write_text("role_special_tokens = ['<|system|>', '<|observation|>']")
    assert detect_family(renamed) == "chatglm3"
    (renamed / "tokenization_chatglm.py").write_text("special_tokens = ['[MASK]', '[gMASK]', 'sop', 'eop']")
    assert detect_family(renamed) == "chatglm2"


def test_unknown_generation_is_one_clear_error(golden3_dir, tmp_path):
    shutil.copy(golden3_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "/home/me/my-finetune"}))
    with pytest.raises(TokenizerError, match="name_or_path"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, family="chatglm3").family == "chatglm3"
    with pytest.raises(TokenizerError, match="no ice_text.model or tokenizer.model"):
        load_tokenizer(tmp_path / "missing")


def test_encode_and_decode_every_golden_text(case):
    tok, golden = case
    assert len(golden["tokenizer"]) == 18
    for item in golden["tokenizer"]:
        text = item["text"]
        assert tok.encode(text, add_special_tokens=False) == item["ids"], text
        assert tok.encode(text) == item["ids_with_special"], text
        assert tok.tokenize(text) == item["tokens"], text
        assert tok.decode(item["ids"]) == item["decoded"], text
        assert tok.decode(item["ids_with_special"]) == item["decoded_with_special"], text


def test_decode_with_special_ids(case):
    tok, golden = case
    for item in golden["decode"]:
        assert tok.decode(item["ids"]) == item["decoded"], item["ids"]
        assert tok.decode(item["ids"], skip_special_tokens=False) == item["decoded"]


def test_special_tokens_and_info(case):
    tok, golden = case
    info = golden["tokenizer_info"]
    assert tok.vocab_size == info["vocab_size"]
    assert tok.num_pieces == info["sentencepiece_pieces"]
    assert tok.padding_side == info["padding_side"]
    assert tok.pad_token_id == info["pad_token_id"]
    assert tok.eos_token_id == info["eos_token_id"]
    assert tok.prefix_tokens == info["prefix_tokens"]
    specials = dict(golden["special_tokens"])
    assert (specials.pop("<bos>"), specials.pop("<eos>"), specials.pop("<pad>")) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.special_tokens == specials
    assert tok.gmask_token_id == specials["[gMASK]"] and tok.sop_token_id == specials["sop"]


def test_roles(golden2_dir, golden3_dir, golden3):
    v3 = load_tokenizer(golden3_dir)
    for role in ("system", "user", "assistant", "observation"):
        assert v3.role_id(role) == golden3["special_tokens"][f"<|{role}|>"]
    # SPEC II.4.2: <|user|> + "\n你好"
    assert v3.build_single_message("user", "", "你好") == [64795, 30910, 13, 36474, 54591]
    assert v3.build_single_message("assistant", "track", "") == [64796] + v3.encode("track\n", add_special_tokens=False)
    with pytest.raises(TokenizerError, match="unknown role"):
        v3.role_id("tool")
    with pytest.raises(TokenizerError, match="ChatGLM3 feature"):
        load_tokenizer(golden2_dir).role_id("user")


def test_batch_left_padding(case):
    tok, golden = case
    for item in golden["batch"]:
        out = tok(item["texts"])
        assert out["input_ids"] == item["input_ids"]
        assert out["attention_mask"] == item["attention_mask"]
        assert out["position_ids"] == item["position_ids"]
        assert tok.batch_encode(item["texts"]) == item["input_ids"]


def test_pair_and_out_of_range(golden2_dir):
    tok = ChatGLM2Tokenizer.from_dir(golden2_dir)
    assert tok.encode_pair("a", "b") == [64790, 64792] + tok.encode("a", False) + tok.encode("b", False) + [2]
    assert tok.decode([64794, 65000, 13755]) == "Hello"  # unused embedding rows decode to nothing
    tok.check_model(65024)
    with pytest.raises(TokenizerError):
        tok.check_model(64000)


def test_stream_decoder_matches_full_decode(case):
    from chatglm_ft.tokenizer import StreamDecoder

    tok, golden = case
    for item in golden["decode"] + golden["tokenizer"]:
        ids = item["ids"]
        stream = StreamDecoder(tok)
        text = "".join(stream.push(i) for i in ids) + stream.flush()
        assert text == tok.decode(ids), ids
