"""Backbone checkpoints: round trip with added tokens, LoRA merged on save, architecture mismatch."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import BackboneCheckpointError

from .conftest import LLAMA, encode


def _logits(bb, texts=("a <loc> red circle",)):
    torch.manual_seed(7)
    images = torch.randn(len(texts), 3, 32, 32)
    ids, mask = encode(bb.tokenizer, list(texts))
    return bb.eval()(images, ids, mask).logits


def test_round_trip_restores_weights_and_tokens(make_backbone, tmp_path):
    bb = make_backbone(freeze_vision=False)
    ids = bb.add_special_tokens(["<loc>"])
    with torch.no_grad():
        bb.projector[0].weight.add_(1.0)
        bb._lm().get_input_embeddings().weight[ids["<loc>"]] = 3.0
    bb.save_backbone(tmp_path / "bb.pt")
    again = make_backbone(checkpoint=str(tmp_path / "bb.pt"))
    assert again.tokenizer.convert_tokens_to_ids("<loc>") == ids["<loc>"]
    assert again.add_special_tokens(["<loc>"]) == ids
    assert torch.allclose(_logits(again), _logits(bb))


def test_lora_backbone_saves_merged_weights_loadable_without_lora(make_backbone, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    bb = make_backbone(lora=lora)
    with torch.no_grad():  # give the adapters and the saved copy of lm_head non-trivial values
        for name, p in bb.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    bb.add_special_tokens(["<loc>"])
    bb.save_backbone(tmp_path / "lora.pt")
    plain = make_backbone(checkpoint=str(tmp_path / "lora.pt"))
    assert plain.peft_model is None
    assert torch.allclose(_logits(plain), _logits(bb), atol=1e-5)
    # and into a LoRA backbone again: LoRA starts from zero, so it equals the merged model
    relora = make_backbone(checkpoint=str(tmp_path / "lora.pt"), lora=lora)
    assert torch.allclose(_logits(relora), _logits(bb), atol=1e-5)


def test_architecture_mismatch_is_a_clear_error(make_backbone, tmp_path):
    make_backbone().save_backbone(tmp_path / "bb.pt")
    with pytest.raises(BackboneCheckpointError, match=r"shape mismatch .*embed_tokens.weight: checkpoint \(\d+, 32\) vs model \(\d+, 48\)"):
        make_backbone(lm_config={**LLAMA, "hidden_size": 48}, checkpoint=str(tmp_path / "bb.pt"))
    with pytest.raises(BackboneCheckpointError, match=r"missing \(\d+\): .*layers\.2\."):
        make_backbone(lm_config={**LLAMA, "num_hidden_layers": 3}, checkpoint=str(tmp_path / "bb.pt"))
    with pytest.raises(BackboneCheckpointError, match="projector"):
        make_backbone(projector="linear", checkpoint=str(tmp_path / "bb.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(BackboneCheckpointError, match="not a vlzoo backbone checkpoint"):
        make_backbone(checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError):
        make_backbone(checkpoint=str(tmp_path / "missing.pt"))
