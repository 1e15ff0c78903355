"""The parts paradigms share are shared, not copied: one SAM prompt head, one answer order, one
spelling of the mask losses, and every size from the backbone interface (issue 17)."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from vlzoo.backbones import Backbone, CausalLM, MultimodalBackbone, TimmVisionEncoder
from vlzoo.data.datamodule import VLDataModule
from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.decoders import BoxDecoder, BoxEncoder, SamMaskDecoder, SamPromptHead
from vlzoo.paradigms import PARADIGMS, AttentionKeypoints, HeatmapMatching, Pixel2Emb, Pixel2Seq
from vlzoo.paradigms.codecs import BinsCodec
from vlzoo.paradigms.pixel2seq import Pixel2SeqAnswerFormat
from vlzoo.structures import Sample, Targets, answer_order

VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 32,
       "model_kwargs": {"embed_dim": 24, "depth": 1, "num_heads": 2, "patch_size": 8}}
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 256}
#: names of sizes a paradigm must read from its backbone, never take as an argument
SIZE_NAMES = {"hidden_size", "vision_dim", "vision_width", "feature_grid", "input_size", "image_size", "embed_dim"}


def backbone() -> MultimodalBackbone:
    torch.manual_seed(0)
    return MultimodalBackbone(vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"))


def sam(bb: MultimodalBackbone) -> SamMaskDecoder:
    return SamMaskDecoder(variant="tiny", image_embedding_size=bb.feature_grid[0], input_image_size=bb.input_size)


def mask_paradigms() -> dict[str, torch.nn.Module]:
    bb1, bb2, bb3 = backbone(), backbone(), backbone()
    return {
        "pixel2emb": Pixel2Emb(backbone=bb1, box_decoder=BoxDecoder(hidden_size=32), box_encoder=BoxEncoder(hidden_size=32),
                               mask_decoder=sam(bb1), tasks=["res"]),
        "heatmap": HeatmapMatching(backbone=bb2, mask_decoder=sam(bb2), tasks=["res"]),
        "attention_keypoints": AttentionKeypoints(backbone=bb3, mask_decoder=sam(bb3), tasks=["res"]),
    }


def test_every_mask_paradigm_uses_the_one_sam_prompt_head():
    paradigms = mask_paradigms()
    necks = set()
    for name, p in paradigms.items():
        assert type(p.mask_head) is SamPromptHead, name
        # no other copy: every SAM decoder in the paradigm sits inside the shared head
        for path, module in p.named_modules():
            if isinstance(module, SamMaskDecoder):
                assert path == "mask_head.decoder", (name, path)
        necks.add(tuple(type(m).__name__ for m in p.mask_head.neck))
        # the head's sizes are the backbone's
        assert p.mask_head.input_size == p.backbone.input_size
        assert p.mask_head.neck[0].in_channels == p.backbone.vision_width
    assert necks == {("Conv2d", "GroupNorm")}


def test_no_paradigm_signature_carries_a_model_size_and_the_backbone_is_required_and_typed():
    for cls in PARADIGMS:
        params = inspect.signature(cls.__init__).parameters
        assert not SIZE_NAMES & set(params), (cls.__name__, sorted(SIZE_NAMES & set(params)))
        assert params["backbone"].default is inspect.Parameter.empty, cls.__name__
        hints = typing.get_type_hints(cls.__init__)
        assert hints["backbone"] is Backbone, (cls.__name__, hints["backbone"])


def test_a_paradigm_without_a_backbone_interface_is_refused():
    with pytest.raises(TypeError, match="lacks .*vision_width"):
        HeatmapMatching(backbone=torch.nn.Linear(2, 2), tasks=["rec"])
    with pytest.raises(TypeError, match="needs a backbone"):
        Pixel2Seq(backbone=None)


def test_both_backbones_implement_the_interface():
    bb = backbone()
    assert isinstance(bb, Backbone)
    assert (bb.hidden_size, bb.vision_width, bb.feature_grid, bb.input_size) == (32, 24, (4, 4), 32)


def test_a_former_mask_loss_name_is_an_error_naming_the_new_one():
    bb = backbone()
    with pytest.raises(ValueError, match="'mask' is now 'mask_bce'.*'dice' is now 'mask_dice'"):
        HeatmapMatching(backbone=bb, mask_decoder=sam(bb), tasks=["res"], loss_weights={"mask": 2.0, "dice": 0.5})


def test_the_mask_paradigms_name_their_mask_losses_alike():
    bb = backbone()
    paradigms = mask_paradigms()
    ds = ShapesDataset(split="train", size=8, image_size=32, tasks=["res"], num_objects=(1, 2))
    for name, p in paradigms.items():
        dm = VLDataModule(tokenizer=p.backbone.tokenizer, answer_format=p.answer_format, image_size=32,
                          image_mean=bb.data_config["mean"], image_std=bb.data_config["std"])
        parts = p.loss(dm.collate()([ds[i] for i in range(2)]))
        assert {"mask_bce", "mask_dice"} <= set(parts), (name, sorted(parts))
        assert not {"mask", "dice"} & set(parts), name


def test_pixel2seq_and_pixel2emb_write_objects_in_the_one_answer_order():
    # centres and top-left corners disagree here: the tall box starts higher but is centred lower
    boxes = torch.tensor([[20.0, 10.0, 28.0, 18.0], [2.0, 4.0, 8.0, 30.0], [2.0, 10.0, 8.0, 14.0]])
    order = answer_order(boxes)
    assert order == [1, 2, 0]
    sample = Sample(image=torch.zeros(3, 32, 32, dtype=torch.uint8), task="det", prompt="find",
                    targets=Targets(boxes=boxes, labels=torch.ones(3, dtype=torch.long)), category_id=1, category_name="circle")
    fmt = Pixel2SeqAnswerFormat(codec=BinsCodec(bins=32))
    written = fmt.parse("det", fmt.format_answer(sample, (32, 32)), (32, 32))["boxes"]
    assert torch.allclose(written, boxes[order], atol=1.0)
    bb = backbone()
    p = Pixel2Emb(backbone=bb, box_decoder=BoxDecoder(hidden_size=32), box_encoder=BoxEncoder(hidden_size=32),
                  tasks=["det"])
    dm = VLDataModule(tokenizer=bb.tokenizer, answer_format=p.answer_format, image_size=32,
                      image_mean=bb.data_config["mean"], image_std=bb.data_config["std"])
    batch = dm.collate()([sample])
    assert torch.allclose(p._target_boxes(batch, 0) * 32, boxes[order], atol=1e-4)
