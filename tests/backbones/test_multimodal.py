"""MultimodalBackbone: splicing layout, loss, attentions, embedding hooks, special tokens, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import encode


def test_image_tokens_are_spliced_at_the_placeholder(make_backbone):
    bb = make_backbone()
    tok = bb.tokenizer
    assert (bb.hidden_size, bb.vision_width, bb.feature_grid, bb.input_size) == (32, 32, (4, 4), 32)
    assert bb.data_config["input_size"] == 32 and bb.image_token_id == tok.convert_tokens_to_ids("<image>")
    # row 0: placeholder at 1 (right padded); row 1: left padded so the placeholder is at 3
    ids = torch.tensor([[tok.bos_token_id, bb.image_token_id, 5, 6, 0, 0],
                        [0, 0, tok.bos_token_id, bb.image_token_id, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, -100, -100, -100, 7, 8]])
    images = torch.randn(2, 3, 32, 32)
    out = bb(images, ids, mask, labels=labels)
    n = 16
    assert out.hidden_states.shape == (2, 6 - 1 + n, 32) and out.logits.shape[:2] == (2, 21)
    assert out.positions.tolist() == [[0, 1, 17, 18, 19, 20], [0, 1, 2, 3, 19, 20]]
    assert out.image_positions[0].tolist() == list(range(1, 17))
    assert out.image_positions[1].tolist() == list(range(3, 19))
    assert out.image_features.shape == (2, 32, 4, 4) and out.image_tokens.shape == (2, 16, 32)
    assert out.attention_mask.tolist()[1] == [0, 0] + [1] * 19
    assert out.attention_mask.tolist()[0] == [1] * 19 + [0, 0]
    # labels follow their tokens; image positions never carry a label
    assert (out.labels[0, 17:19] == torch.tensor([5, 6])).all() and (out.labels[1, 19:21] == torch.tensor([7, 8])).all()
    assert (out.labels.gather(1, out.image_positions) == -100).all()
    # the loss is next-token cross-entropy on the expanded labels
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), out.labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-6)
    # the spliced inputs: text embeddings at `positions`, projected image tokens at image positions
    text = bb.embed_tokens(ids)
    sp = bb.splice(text, ids, mask, out.image_tokens)
    assert torch.equal(sp.embeds[0, 17], text[0, 2]) and torch.equal(sp.embeds[1, 3:19], out.image_tokens[1])
    assert out.text_hidden_states().shape == (2, 6, 32)
    assert torch.equal(out.text_hidden_states()[1, 5], out.hidden_states[1, 20])


def test_each_row_needs_exactly_one_image_token(make_backbone):
    bb = make_backbone()
    ids, mask = encode(bb.tokenizer, ["a red circle"])
    double = torch.cat([ids, torch.tensor([[bb.image_token_id]])], 1)
    with pytest.raises(ValueError, match="exactly one"):
        bb(torch.randn(1, 3, 32, 32), double, torch.ones_like(double))
    with pytest.raises(ValueError, match="exactly one"):
        bb(torch.randn(1, 3, 32, 32), ids[:, 2:], mask[:, 2:])


def test_padding_does_not_change_a_row(make_backbone):
    bb = make_backbone().eval()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = encode(bb.tokenizer, ["a red circle", "the blue square is in the left half"])
    both = bb(images, ids, mask)
    alone = bb(images[:1], ids[:1, :5], mask[:1, :5])
    assert torch.allclose(both.text_hidden_states()[0, :5], alone.text_hidden_states()[0], atol=1e-5)


def test_attention_maps_of_chosen_layers(make_backbone):
    bb = make_backbone().eval()
    ids, mask = encode(bb.tokenizer, ["a red circle", "the blue"])
    images = torch.randn(2, 3, 32, 32)
    plain = bb(images, ids, mask)
    assert plain.attentions is None
    impl = bb._lm().get_decoder().config._attn_implementation
    out = bb(images, ids, mask, output_attentions=[-1, 0])
    assert sorted(out.attentions) == [0, 1]
    att = out.attentions[1]
    assert att.shape == (2, 4, 20, 20)
    assert torch.allclose(att[0, :, :19].sum(-1), torch.ones(4, 19), atol=1e-5)
    assert att[0, :, 3, 4:].abs().max() == 0  # causal
    assert att[1, :, :, 19].abs().max() == 0  # padded key of row 1 gets no attention
    assert torch.allclose(out.logits, plain.logits, atol=1e-4)  # eager for this call only, same model
    assert bb._lm().get_decoder().config._attn_implementation == impl == "sdpa"  # restored


def test_inputs_embeds_fn_replaces_a_token_embedding(make_backbone):
    bb = make_backbone()
    ids_map = bb.add_special_tokens(["<loc>"])
    loc = ids_map["<loc>"]
    ids, mask = encode(bb.tokenizer, ["the <loc> is red"])
    box = torch.nn.Parameter(torch.randn(32))

    def put_box(embeds, input_ids):
        return torch.where((input_ids == loc)[..., None], box.to(embeds.dtype), embeds)

    images = torch.randn(1, 3, 32, 32)
    out = bb(images, ids, mask, inputs_embeds_fn=put_box)
    ref = bb(images, ids, mask)
    i = out.positions[0, 3]
    assert not torch.allclose(out.hidden_states[0, i], ref.hidden_states[0, i])
    assert torch.allclose(out.hidden_states[0, : i], ref.hidden_states[0, : i], atol=1e-6)
    out.hidden_states[0, -1].sum().backward()
    assert box.grad is not None and box.grad.abs().sum() > 0


def test_add_special_tokens_is_idempotent_and_resizes(make_backbone):
    bb = make_backbone()
    rows = bb._lm().get_input_embeddings().weight.shape[0]
    ids = bb.add_special_tokens(["<loc>", "[SEG]", "red"])
    assert ids["red"] == bb.tokenizer.convert_tokens_to_ids("red")  # already present
    assert ids["<loc>"] == rows and ids["[SEG]"] == rows + 1
    assert bb._lm().get_input_embeddings().weight.shape[0] == rows + 2
    assert bb._lm().get_output_embeddings().weight.shape[0] == rows + 2
    assert bb.add_special_tokens(["[SEG]", "<loc>"]) == {"[SEG]": rows + 1, "<loc>": rows}
    assert bb._lm().get_input_embeddings().weight.shape[0] == rows + 2
    assert bb.tokenizer.convert_ids_to_tokens(rows + 1) == "[SEG]"
    # new rows start at the mean of the old ones; the tokens are usable in a forward
    emb = bb._lm().get_input_embeddings().weight
    assert torch.allclose(emb[rows], emb[:rows].mean(0), atol=1e-6)
    ids_t, mask = encode(bb.tokenizer, ["[SEG] <loc>"])
    assert bb(torch.randn(1, 3, 32, 32), ids_t, mask).logits.shape[-1] == rows + 2


def test_generation_with_and_without_cache_agree(make_backbone):
    bb = make_backbone().eval()
    images = torch.randn(4, 3, 32, 32)
    prompts = ["a", "the blue square is in", "what colour is the circle", "is the red"]
    ids, mask = encode(bb.tokenizer, prompts, left=True)
    cached = bb.generate(images, ids, mask, max_new_tokens=8, eos_token_id=[])
    full = bb.generate(images, ids, mask, max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert cached.shape == (4, 8) and torch.equal(cached, full)
    # each row generated alone (no padding) gives the same tokens as in the left-padded batch
    for i, prompt in enumerate(prompts):
        alone_ids, alone_mask = encode(bb.tokenizer, [prompt], left=True)
        alone = bb.generate(images[i : i + 1], alone_ids, alone_mask, max_new_tokens=8, eos_token_id=[])
        assert torch.equal(alone[0], cached[i])
    # greedy = argmax of the forward logits over the prompt + generated text
    seq = torch.cat([ids, cached[:, :-1]], 1)
    out = bb(images, seq, torch.cat([mask, torch.ones_like(cached[:, :-1])], 1))
    n_prompt = out.positions.shape[1] - 7
    steps = out.logits[:, out.positions[0, n_prompt - 1] :].argmax(-1)
    assert torch.equal(steps, cached)


def test_generation_logits_processor_and_eos(make_backbone):
    bb = make_backbone().eval()
    tok = bb.tokenizer
    images = torch.randn(2, 3, 32, 32)
    ids, mask = encode(tok, ["a red", "the"], left=True)
    red = tok.convert_tokens_to_ids("red")
    seen = []

    def force(prefix, scores):
        seen.append(prefix.shape[1])
        scores = torch.full_like(scores, -1e9)
        scores[0, red] = 0
        scores[1, tok.eos_token_id] = 0
        return scores

    out = bb.generate(images, ids, mask, max_new_tokens=5, logits_processor=force)
    # row 1 ends at once; row 0 never emits eos, so all 5 steps run; finished rows are padded
    assert out[0].tolist() == [red] * 5
    assert out[1].tolist() == [tok.eos_token_id] + [tok.pad_token_id] * 4
    assert seen == [ids.shape[1] + i for i in range(5)]
    stop = bb.generate(images[1:], ids[1:], mask[1:], max_new_tokens=5, logits_processor=lambda p, s: force(
        p, torch.cat([s, s]))[1:])
    assert stop.tolist() == [[tok.eos_token_id]]


def test_tied_embeddings_stay_tied_after_resizing(make_backbone):
    from .conftest import LLAMA

    bb = make_backbone(freeze_lm=True, lm_config={**LLAMA, "tie_word_embeddings": True})
    rows = bb._vocab_rows()
    new = bb.add_special_tokens(["<loc>"])["<loc>"]
    emb, head = bb._lm().get_input_embeddings(), bb._lm().get_output_embeddings()
    assert head.weight is emb.weight and emb.weight.shape[0] == rows + 1 and head.out_features == rows + 1
    ids, mask = encode(bb.tokenizer, ["a <loc>"])
    bb(torch.randn(1, 3, 32, 32), ids, mask, labels=ids).loss.backward()
    assert emb.weight.grad.abs().sum(-1).nonzero().flatten().tolist() == [new]
