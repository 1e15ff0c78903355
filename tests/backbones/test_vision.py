"""Vision encoders: token / feature-map shapes and strides, data configs, local weight loading."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import ClipVisionEncoder, SamImageEncoder, TimmVisionEncoder

from .conftest import VIT

CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8}


def test_timm_vit_tokens_and_map_agree():
    enc = TimmVisionEncoder(**VIT)
    assert (enc.dim, enc.stride, enc.input_size, enc.feature_grid) == (32, 8, 32, (4, 4))
    assert enc.data_config == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": 32}
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 16, 32) and out.feature_map.shape == (2, 32, 4, 4)
    # token k is the patch at row k // 4, column k % 4 (CLS dropped)
    assert torch.equal(out.feature_map[:, :, 1, 2], out.tokens[:, 6])
    full = enc.model.forward_features(torch.zeros(1, 3, 32, 32))
    assert full.shape[1] == 17


def test_timm_checkpoint_path_loads_local_file(tmp_path):
    torch.manual_seed(1)
    src = TimmVisionEncoder(**VIT)
    path = tmp_path / "vit.pth"
    torch.save(src.model.state_dict(), path)
    torch.manual_seed(2)
    dst = TimmVisionEncoder(**VIT, checkpoint_path=str(path))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(src(x).tokens, dst(x).tokens)
    with pytest.raises(FileNotFoundError):
        TimmVisionEncoder(**VIT, checkpoint_path=str(tmp_path / "missing.pth"))


def test_timm_cnn_feature_map():
    enc = TimmVisionEncoder(model_name="resnet10t", img_size=None)
    out = enc(torch.randn(1, 3, 64, 64))
    assert enc.stride == 32 and out.feature_map.shape == (1, enc.dim, 2, 2)
    assert out.tokens.shape == (1, 4, enc.dim)


def test_clip_round_trip_and_layer_selection(tmp_path):
    enc = ClipVisionEncoder(config=CLIP)
    assert (enc.dim, enc.stride, enc.input_size, enc.feature_grid) == (32, 8, 32, (4, 4))
    x = torch.randn(2, 3, 32, 32)
    out = enc(x)
    assert out.tokens.shape == (2, 16, 32) and out.feature_map.shape == (2, 32, 4, 4)
    hidden = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.allclose(out.tokens, hidden[-2][:, 1:])  # LLaVA's penultimate layer, no CLS
    enc.save_pretrained(tmp_path / "clip")
    again = ClipVisionEncoder(name_or_path=str(tmp_path / "clip"), select_feature="cls_patch", select_layer=-1)
    out2 = again(x)
    assert out2.tokens.shape == (2, 17, 32)
    assert torch.allclose(out2.tokens, hidden[-1], atol=1e-6)
    assert torch.allclose(out2.feature_map.flatten(2).transpose(1, 2), hidden[-1][:, 1:], atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        ClipVisionEncoder()


def test_sam_encoder_loads_official_key_layout(tmp_path):
    torch.manual_seed(3)
    src = SamImageEncoder(variant="tiny")
    state = {f"image_encoder.{k}": v for k, v in src.model.state_dict().items()}
    state["mask_decoder.some.weight"] = torch.zeros(1)  # other SAM parts are ignored
    path = tmp_path / "sam_tiny.pth"
    torch.save(state, path)
    dst = SamImageEncoder(variant="tiny", checkpoint=str(path))
    x = torch.randn(1, 3, 64, 64)
    out = dst(x)
    assert out.feature_map.shape == (1, 32, 8, 8) and dst.feature_grid == (8, 8)
    assert torch.allclose(out.feature_map, src(x).feature_map)
    # another input size: position tables are interpolated
    small = SamImageEncoder(variant="tiny", checkpoint=str(path), img_size=32)
    assert small(torch.randn(1, 3, 32, 32)).feature_map.shape == (1, 32, 4, 4)
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="image_encoder"):
        SamImageEncoder(variant="tiny", checkpoint=str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="unknown SAM variant"):
        SamImageEncoder(variant="vit_x")
