"""Coordinate codecs: exact family formats, round trips, transformers' reference helpers, grammars."""

from __future__ import annotations

import re

import pytest
import regex
import torch

from vlzoo.paradigms.codecs import (
    CODECS,
    COORD,
    BinsCodec,
    CodecError,
    Florence2Codec,
    Kosmos2Codec,
    PaliGemmaCodec,
    Qwen2VLCodec,
    Qwen25VLCodec,
    ShikraCodec,
    make_codec,
)

SIZE = (48, 64)  # (H, W), not square, so x / y mix-ups show
# (H, W) image sizes for the reference checks: square, landscape, portrait, odd, tiny, above 1000
REFERENCE_SIZES = [(480, 640), (768, 768), (1333, 800), (333, 517), (37, 91), (1000, 2000)]


def _boxes(n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy1 = torch.rand(n, 2, generator=g) * 0.6
    wh = 0.1 + torch.rand(n, 2, generator=g) * 0.3
    b = torch.cat([xy1, xy1 + wh], 1)
    return b * torch.tensor([SIZE[1], SIZE[0], SIZE[1], SIZE[0]], dtype=torch.float32)


def _normalise(codec, text: str) -> str:
    """Normalised text as the constrained decoder sees it (special tokens -> symbols)."""
    tokens = sorted(codec.special_tokens, key=len, reverse=True)
    if not tokens:
        return "".join(text.split())
    pieces = re.split("(" + "|".join(re.escape(t) for t in tokens) + ")", text)
    out = []
    for p in pieces:
        sym = codec.normalise_token(p)
        out.append(sym if sym is not None else "".join(p.split()))
    return "".join(out)


# worst-case round-trip error in pixels of a 64 x 48 image per codec (quantisation step)
TOLERANCE = {
    "bins": 0.51 * 64 / 63,
    "florence2": 1 + 64 / 1000,  # transformers' post-processor truncates the bin centre to a whole pixel
    "paligemma": 0.51 * 64 / 1023,
    "qwen2vl": 0.51 * 64 / 1000,
    "qwen2.5vl": 0.51,
    "shikra": 0.51e-3 * 64,
    "kosmos2": 64 / 32,
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_round_trip_boxes_and_points(name):
    codec = make_codec(name)
    boxes = _boxes()
    text = codec.encode(boxes, SIZE)
    back = codec.decode(text, SIZE)
    assert back.shape == boxes.shape
    assert (back - boxes).abs().max() <= TOLERANCE[name] + 1e-4
    points = boxes.reshape(-1, 2)
    ptext = codec.encode_points(points, SIZE)
    pback = codec.decode_points(ptext, SIZE)
    assert pback.shape == points.shape
    tol = 64 / 32 / 2 + 1e-4 if name == "kosmos2" else TOLERANCE[name] + 1e-4
    assert (pback - points).abs().max() <= tol
    # decoding what decoding gives is stable (quantisation is idempotent on bin values); Florence-2's
    # whole pixels are not bin values (a truncated centre can fall into the bin below)
    if name != "florence2":
        assert torch.allclose(codec.decode(codec.encode(back, SIZE), SIZE), back, atol=1e-4)


def test_florence2_float_bin_centre_option():
    codec = Florence2Codec(whole_pixels=False)
    boxes = _boxes()
    back = codec.decode(codec.encode(boxes, SIZE), SIZE)
    assert (back - boxes).abs().max() <= 64 / 1000 / 2 + 1e-4
    assert torch.allclose(codec.decode(codec.encode(back, SIZE), SIZE), back, atol=1e-4)
    whole = Florence2Codec().decode(codec.encode(boxes, SIZE), SIZE)
    assert torch.equal(whole, back.double().floor().float())


@pytest.mark.parametrize("name", sorted(CODECS))
def test_grammars_accept_encoded_text(name):
    codec = make_codec(name)
    boxes = _boxes(3)
    one = _normalise(codec, codec.encode(boxes[:1], SIZE))
    many = _normalise(codec, codec.encode(boxes, SIZE))
    pts = _normalise(codec, codec.encode_points(boxes.reshape(-1, 2), SIZE))
    assert regex.fullmatch(codec.boxes_grammar(1, 1), one)
    assert regex.fullmatch(codec.boxes_grammar(1, None), many)
    if name not in ("kosmos2", "shikra"):  # several boxes of one object are one group there
        assert not regex.fullmatch(codec.boxes_grammar(1, 1), many)
    assert regex.fullmatch(codec.points_grammar(6, 6), pts)
    assert not regex.fullmatch(codec.points_grammar(7, 7), pts)
    phrased = _normalise(codec, codec.encode(boxes[:1], SIZE, phrase="the red circle"))
    assert regex.fullmatch(codec.boxes_grammar(1, 1, phrase=True), phrased)
    # a strict prefix is a partial match, garbage is not
    assert regex.fullmatch(codec.boxes_grammar(1, 1), one[:-1], partial=True).partial
    assert regex.fullmatch(codec.boxes_grammar(1, 1), "zz" + one, partial=True) is None


def test_exact_formats():
    size = (100, 200)
    box = torch.tensor([[20.0, 10.0, 100.0, 50.0]])
    assert BinsCodec(bins=11).encode(box, size) == "<bin_1><bin_1><bin_5><bin_5>"
    assert BinsCodec(bins=11, y_first=True).encode(box, size) == "<bin_1><bin_1><bin_5><bin_5>"
    assert BinsCodec(bins=11, y_first=True).encode(torch.tensor([[20.0, 30.0, 100.0, 50.0]]), size) == (
        "<bin_3><bin_1><bin_5><bin_5>"
    )
    assert Florence2Codec().encode(box, size) == "<loc_100><loc_100><loc_500><loc_500>"
    assert PaliGemmaCodec().encode(box, size) == "<loc0102><loc0102><loc0512><loc0512>"
    two = torch.tensor([[20.0, 10.0, 100.0, 50.0], [0.0, 0.0, 200.0, 100.0]])
    assert PaliGemmaCodec().encode(two, size, phrase="cat") == (
        "<loc0102><loc0102><loc0512><loc0512> cat ; <loc0000><loc0000><loc1023><loc1023> cat"
    )
    assert Qwen2VLCodec().encode(box, size, phrase="the cat") == (
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
    )
    assert Qwen25VLCodec().encode(box, size) == "<|box_start|>(20,10),(100,50)<|box_end|>"
    assert ShikraCodec().encode(two, size) == "[0.100,0.100,0.500,0.500;0.000,0.000,1.000,1.000]"
    assert Kosmos2Codec().encode(two, size, phrase="a cat") == (
        "<phrase>a cat</phrase><object><patch_index_0099><patch_index_0495>"
        "</delimiter_of_multi_objects/><patch_index_0000><patch_index_1023></object>"
    )


@pytest.mark.parametrize("size", REFERENCE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kosmos2_matches_transformers_helpers(size):
    """Kosmos-2's processor takes boxes normalised by the image size: pixel boxes divided by (W, H)
    give the processor's patch indices, and decoding gives its coordinates times (W, H); 5,000 boxes."""
    kosmos = pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")
    codec = Kosmos2Codec()
    h, w = size
    g = torch.Generator().manual_seed(h * 31 + w)
    xy1 = torch.rand(5000, 2, generator=g, dtype=torch.float64) * 0.9
    wh = 0.001 + torch.rand(5000, 2, generator=g, dtype=torch.float64) * 0.5
    norm = torch.cat([xy1, (xy1 + wh).clamp(max=1.0)], 1)
    pixels = (norm * torch.tensor([w, h, w, h], dtype=torch.float64)).round(decimals=2)
    for box in pixels.tolist():
        x1, y1, x2, y2 = box
        ref = kosmos.coordinate_to_patch_index((x1 / w, y1 / h, x2 / w, y2 / h), 32)
        assert codec.patch_indices(box, size) == ref
        rx1, ry1, rx2, ry2 = kosmos.patch_index_to_coordinate(*ref, 32)
        assert codec.box_from_indices(*ref, size) == pytest.approx((rx1 * w, ry1 * h, rx2 * w, ry2 * h), abs=1e-9)


def test_kosmos2_text_round_trips_through_transformers_parsers():
    kosmos = pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")
    codec = Kosmos2Codec()
    size = (1.0, 1.0)  # normalised boxes, as the processor takes them
    # the reference parser reads our text, and we read the text the reference helper cleans
    text = codec.encode(torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]]), size, phrase=" a snowman")
    entities = kosmos.extract_entities_with_patch_indices(text)
    ours = codec.decode(text, size)
    theirs = [kosmos.patch_index_to_coordinate(int(a), int(b), 32) for a, b in entities[0][2]]
    assert torch.allclose(ours, torch.tensor(theirs, dtype=torch.float32))
    generated = "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>."
    _, found = kosmos.clean_text_and_extract_entities_with_bboxes(generated)
    assert torch.allclose(codec.decode(generated, size), torch.tensor(found[0][2], dtype=torch.float32))


@pytest.mark.parametrize("size", REFERENCE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_florence2_matches_transformers_post_processor(size):
    """Both directions against the Florence-2 post-processor transformers ships, 5,000 boxes per size."""
    florence = pytest.importorskip("transformers.models.florence2.processing_florence2")

    class _Tok:
        all_special_tokens: list[str] = []

    post = florence.Florence2PostProcessor(None, _Tok())
    codec = Florence2Codec()
    h, w = size
    g = torch.Generator().manual_seed(h * 7919 + w)
    boxes = torch.rand(5000, 4, generator=g) * torch.tensor([w, h, w, h]) * 1.02 - 0.01 * torch.tensor([w, h, w, h])
    boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])], 1)
    # whole-pixel and exact bin-edge coordinates, where floor and float rounding are most fragile
    edges = torch.randint(0, 1000, (500, 4), generator=g).float() * torch.tensor([w, h, w, h]) / 1000
    boxes = torch.cat([boxes, boxes.round()[:500], edges]).float()
    ref = post.quantize(boxes, (w, h))
    text = codec.encode(boxes, (h, w))
    ours = torch.tensor([int(v) for v in re.findall(r"<loc_(\d+)>", text)]).reshape(-1, 4)
    assert torch.equal(ours, ref.long())
    # decoding, through the post-processor's own parser of a grounding answer: identical pixels
    parsed = post.parse_description_with_bboxes_from_text_and_spans("a red circle" + text, image_size=(w, h))
    theirs = torch.tensor([inst["bbox"] for inst in parsed], dtype=torch.float64)
    assert torch.equal(codec.decode(text, (h, w)).double(), theirs)
    assert torch.equal(codec.decode(text, (h, w)).double(), post.dequantize(ref, (w, h)).double())
    # points (polygon vertices, keypoints) use the (N, 2) path of both
    pts = boxes[:, :2]
    ptext = codec.encode_points(pts, (h, w))
    pref = post.quantize(pts, (w, h))
    pours = torch.tensor([int(v) for v in re.findall(r"<loc_(\d+)>", ptext)]).reshape(-1, 2)
    assert torch.equal(pours, pref.long())
    assert torch.equal(codec.decode_points(ptext, (h, w)).double(), post.dequantize(pref, (w, h)).double())


def test_paligemma_tokens_are_the_processors():
    """transformers ships PaliGemma's location-token names (not a quantizer or parser): the spelling
    is checked against them; the binning against big_vision's formula below."""
    paligemma = pytest.importorskip("transformers.models.paligemma.processing_paligemma")
    assert list(PaliGemmaCodec().coordinate_tokens) == [t for t in paligemma.EXTRA_TOKENS if t.startswith("<loc")]


def test_paligemma_matches_big_vision_binning():
    codec = PaliGemmaCodec()
    size = (480, 640)
    norm = torch.rand(20, 4)  # ymin, xmin, ymax, xmax normalised, as big_vision stores boxes
    pixels = torch.stack([norm[:, 1] * 640, norm[:, 0] * 480, norm[:, 3] * 640, norm[:, 2] * 480], 1)
    text = codec.encode(pixels, size)
    got = [int(v) for v in re.findall(r"<loc(\d{4})>", text)]
    expected = (norm * 1023).round().clamp(0, 1023).long().reshape(-1).tolist()
    assert got == expected


def test_parse_errors_and_bad_input():
    with pytest.raises(CodecError):
        BinsCodec().decode("<bin_1><bin_2><bin_3>", SIZE)
    with pytest.raises(CodecError):
        BinsCodec(bins=8).decode("<bin_1><bin_2><bin_3><bin_9>", SIZE)
    with pytest.raises(CodecError):
        ShikraCodec().decode("[0.1,0.2,0.3]", SIZE)
    with pytest.raises(CodecError):
        ShikraCodec().decode("no box at all", SIZE)
    with pytest.raises(CodecError):
        Qwen2VLCodec().decode("<|box_start|>(1,2),(3,x)<|box_end|>", SIZE)
    with pytest.raises(CodecError):
        Qwen2VLCodec().decode("<|box_start|>(1,2),(3,1200)<|box_end|>", SIZE)
    with pytest.raises(CodecError):
        Kosmos2Codec().decode("<object><patch_index_0001></object>", SIZE)
    with pytest.raises(ValueError, match="unknown coordinate codec"):
        make_codec("pix2seq")
    with pytest.raises(ValueError, match="bins"):
        make_codec("florence2", bins=10)
    with pytest.raises(ValueError, match="image_size"):
        BinsCodec().encode(torch.zeros(1, 4), (0, 10))


def test_special_tokens_per_family():
    assert len(BinsCodec(bins=16).special_tokens) == 16
    assert len(Florence2Codec().special_tokens) == 1000
    assert len(PaliGemmaCodec().special_tokens) == 1024
    assert "</delimiter_of_multi_objects/>" in Kosmos2Codec().special_tokens
    assert len(Kosmos2Codec().coordinate_tokens) == 1024
    assert ShikraCodec().special_tokens == ()
    assert set(Qwen2VLCodec().special_tokens) == {
        "<|box_start|>",
        "<|box_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
    }
    assert BinsCodec().normalise_token("<bin_3>") == COORD
