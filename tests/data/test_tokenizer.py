"""The Shapes word tokenizer covers every prompt and answer and round-trips through a folder."""

from __future__ import annotations

from transformers import AutoTokenizer

from vlzoo.data.answers import AnswerFormat, plain_box_text
from vlzoo.data.datamodule import DEFAULT_TEMPLATE
from vlzoo.data.shapes import ShapesDataset
from vlzoo.data.tokenizer import SPECIAL_TOKENS, save_shapes_tokenizer, shapes_tokenizer
from vlzoo.structures import TASKS


def test_every_shapes_text_tokenizes_without_unk():
    tok = shapes_tokenizer()
    fmt = AnswerFormat()
    ds = ShapesDataset(tasks=list(TASKS), size=600, num_objects=(2, 6))
    texts = [DEFAULT_TEMPLATE.replace("{prompt}", "where is the red circle?")]
    for i in range(600):
        s = ds[i]
        texts.append(fmt.format_prompt(s, (64, 64)))
        texts += [s.answer or "", *s.targets.expressions, *s.targets.captions]
        texts += [plain_box_text(b.tolist(), (64, 64)) for b in s.targets.boxes]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids) == text.lower()


def test_special_tokens_and_coordinates():
    tok = shapes_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    ids = tok("<image> Where is [0.123,0.456,0.789,0.900]?", add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<image>" and toks.count("0") == 6 and "," in toks and "?" in toks
    assert tok.unk_token_id not in ids
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_save_and_autotokenizer_round_trip(tmp_path):
    path = save_shapes_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(path))
    tok = shapes_tokenizer()
    text = "<image> user: locate the red circle. assistant: [0.1,0.2,0.3,0.4]"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.convert_tokens_to_ids("<image>") == 4 and len(loaded) == len(tok)
