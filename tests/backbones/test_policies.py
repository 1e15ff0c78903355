"""Training policies: frozen parts get no gradient, new token rows do, LoRA, checkpointing, report."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import parameter_report

from .conftest import encode


def _step(bb, texts=("a <loc> red circle", "[SEG] the blue")):
    ids, mask = encode(bb.tokenizer, list(texts))
    labels = ids.masked_fill(mask == 0, -100)
    out = bb(torch.randn(len(texts), 3, 32, 32), ids, mask, labels=labels)
    out.loss.backward()
    return out


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_default_policy_freezes_only_vision(make_backbone):
    bb = make_backbone()
    _step(bb, ("a red circle",))
    assert all(g is None for g in _grads(bb.vision).values())
    assert all(g is not None for g in _grads(bb.projector).values())
    assert all(g is not None for n, g in _grads(bb.language).items() if "layers" in n)


def test_frozen_lm_trains_exactly_the_new_rows(make_backbone):
    bb = make_backbone(freeze_lm=True, freeze_projector=True, freeze_vision=False)
    ids = bb.add_special_tokens(["<loc>", "[SEG]"])
    new = sorted(ids.values())
    _step(bb)
    assert all(g is not None for g in _grads(bb.vision).values())
    assert all(g is None for g in _grads(bb.projector).values())
    emb = bb._lm().get_input_embeddings().weight
    head = bb._lm().get_output_embeddings().weight  # the tiny llama does not tie them
    for name, grad in _grads(bb.language).items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert grad is None, name
    old = [i for i in range(emb.shape[0]) if i not in new]
    for w in (emb, head):
        assert w.grad[old].abs().max() == 0
        assert (w.grad[new].abs().sum(-1) > 0).all()
    assert bb.no_weight_decay() == {"language.model.model.embed_tokens.weight", "language.model.lm_head.weight"}
    # an optimizer step with that group leaves old rows untouched
    before = emb.detach().clone()
    torch.optim.AdamW([emb], lr=0.1, weight_decay=0.0).step()
    assert torch.equal(emb[old], before[old]) and not torch.equal(emb[new], before[new])


def test_tokens_added_twice_keep_one_mask_and_untied_head_is_masked(make_backbone):
    from .conftest import LLAMA

    bb = make_backbone(freeze_lm=True, lm_config={**LLAMA, "tie_word_embeddings": False})
    first = bb.add_special_tokens(["<loc>"])["<loc>"]
    second = bb.add_special_tokens(["[SEG]"])["[SEG]"]
    _step(bb)
    emb = bb._lm().get_input_embeddings().weight
    head = bb._lm().get_output_embeddings().weight
    assert head is not emb
    for w in (emb, head):
        rows = w.grad.abs().sum(-1).nonzero().flatten().tolist()
        assert rows == [first, second]


def test_new_rows_frozen_when_asked(make_backbone):
    bb = make_backbone(freeze_lm=True, train_new_embeddings=False)
    bb.add_special_tokens(["<loc>", "[SEG]"])
    _step(bb)
    assert all(g is None for g in _grads(bb.language).values())
    assert bb.no_weight_decay() == set()


def test_lora_trains_adapters_modules_to_save_and_new_rows(make_backbone):
    from .conftest import LLAMA

    bb = make_backbone(lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
                       lm_config={**LLAMA, "tie_word_embeddings": False})
    ids = bb.add_special_tokens(["<loc>", "[SEG]"])
    _step(bb)
    grads = _grads(bb.language)
    lora = [n for n in grads if "lora_" in n]
    assert lora and all(grads[n] is not None for n in lora)
    saved = [n for n in grads if "modules_to_save" in n]
    assert saved and all(grads[n] is not None for n in saved)
    for n, g in grads.items():
        if "lora_" in n or "modules_to_save" in n or "embed_tokens" in n:
            continue
        assert g is None, n
    emb = bb._lm().get_input_embeddings().weight
    assert emb.grad.abs().sum(-1).nonzero().flatten().tolist() == sorted(ids.values())
    assert all(g is not None for g in _grads(bb.projector).values())
    with pytest.raises(ValueError, match="embeddings"):
        make_backbone(lora={"target_modules": ["embed_tokens"]})
    with pytest.raises(ValueError, match="unknown lora"):
        make_backbone(lora={"rank": 4})


def test_gradient_checkpointing_gives_the_same_gradients(make_backbone):
    plain = make_backbone(freeze_vision=False)
    ckpt = make_backbone(freeze_vision=False, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt._lm().get_decoder().gradient_checkpointing
    torch.manual_seed(5)
    _step(plain, ("a red circle",))
    torch.manual_seed(5)
    _step(ckpt, ("a red circle",))
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), n


def test_parameter_report_counts_trainable_and_total(make_backbone):
    bb = make_backbone(freeze_lm=True, freeze_projector=True)
    total = sum(p.numel() for p in {id(p): p for p in bb.parameters()}.values())
    assert parameter_report(bb) == {"trainable": 0, "total": total}
    bb = make_backbone()
    proj = sum(p.numel() for p in bb.projector.parameters())
    lm = sum(p.numel() for p in {id(p): p for p in bb.language.parameters()}.values())
    assert parameter_report(bb)["trainable"] == proj + lm
