"""A tiny pixel2emb (timm ViT + 2-layer Llama, hidden 32) and Shapes batches for its tests."""

from __future__ import annotations

import torch

from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder
from vlzoo.data.datamodule import VLDataModule
from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.decoders import BoxDecoder, BoxEncoder, TriggerImageAttention
from vlzoo.paradigms.pixel2emb import EmbeddingAnswerFormat, Pixel2Emb

VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 32,
       "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}}
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 256}


def make_backbone(**policy):
    torch.manual_seed(0)
    return MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"), **policy
    )


def make_paradigm(backbone=None, *, fmt=None, attention=False, **kwargs):
    bb = backbone or make_backbone()
    h = bb.hidden_size
    return Pixel2Emb(
        backbone=bb,
        answer_format=fmt or EmbeddingAnswerFormat(),
        box_decoder=BoxDecoder(hidden_size=h),
        box_encoder=BoxEncoder(hidden_size=h),
        image_attention=TriggerImageAttention(hidden_size=h, feature_grid=bb.feature_grid, num_heads=2)
        if attention
        else None,
        tasks=kwargs.pop("tasks", ["rec", "det", "reg"]),
        **kwargs,
    )


def make_batch(paradigm, tasks=("rec", "det", "reg"), n=6, index=0):
    bb = paradigm.backbone
    ds = ShapesDataset(split="train", size=64, image_size=32, tasks=list(tasks), num_objects=(2, 4))
    dm = VLDataModule(tokenizer=bb.tokenizer, answer_format=paradigm.answer_format, image_size=32,
                      image_mean=bb.data_config["mean"], image_std=bb.data_config["std"])
    return dm.collate()([ds[i] for i in range(index, index + n)])


def mask_decoder(bb):
    """A tiny SAM mask decoder on ``bb``'s feature grid."""
    from vlzoo.decoders.sam import SamMaskDecoder

    return SamMaskDecoder(variant="tiny", image_embedding_size=bb.feature_grid[0], input_image_size=bb.input_size)
