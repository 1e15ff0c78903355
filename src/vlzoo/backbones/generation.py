"""Greedy decoding with a KV cache: the one loop every generating paradigm runs.

:func:`greedy_decode` encodes the image once, splices it into the prompt's input embeddings
(the same splice as the backbone's forward), runs the LM over the whole prompt once and then one
position per step, keeping keys and values in a transformers ``DynamicCache``.  What a paradigm
does differently lives in a :class:`DecodingHooks` subclass:

* :meth:`~DecodingHooks.choose` - the next token of every row from the newest position's scores
  (plain greedy: argmax after an optional ``LogitsProcessor``);
* :meth:`~DecodingHooks.next_embeds` - the input embedding of the chosen token (NExT-Chat puts
  ``BoxEncoder(decoded box)`` at the ``<loc>`` after a trigger: that embedding is what enters
  the cache);
* :meth:`~DecodingHooks.observe` - read each pass (a trigger's hidden state -> a box);
* :meth:`~DecodingHooks.attention_layers` - layers whose attention the next pass returns
  (refocusing reads the trigger's last-layer attention);
* :meth:`~DecodingHooks.final_pass` - after the last token, run the model once more over it
  (a trigger emitted last still gets its box).

Batches are left-padded prompts; position ids count attended tokens only, so a padded row
decodes like the same row alone.  After a row emits an eos token it is filled with the pad id,
which is not attended.  ``use_cache=False`` re-runs the whole (embedded) sequence every step -
the same embeddings, so the same answers - and exists to check the cache.  A prefix LM
(PaliGemma: ``backbone.bidirectional_prefix``) reads its whole prompt bidirectionally in the
prompt pass; every generated token is causal (it sees the prompt and the tokens before it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["DecodingHooks", "DecodingState", "greedy_decode"]


@dataclass
class DecodingState:
    """What the hooks see after a pass of the LM (``T`` = expanded length so far).

    It carries the names of :class:`~vlzoo.backbones.MultimodalOutput` that a head reads
    (``hidden_states``, ``attentions``, ``image_features``, ``image_tokens``,
    ``image_hidden_states()``), so code written for a forward pass reads a decoding step too.
    """

    step: int  # tokens generated so far (0 after the prompt pass)
    ids: Tensor  # (B, L + step) text ids: the prompt, then the generated tokens
    scores: Tensor  # (B, V) float next-token logits at the newest position
    hidden: Tensor  # (B, D) last-layer hidden state at the newest position
    finished: Tensor  # (B,) rows that have emitted an eos token
    attentions: dict[int, Tensor]  # layer -> (B, heads, T) attention of the newest position (asked layers)
    image_features: Tensor  # (B, vision_width, h, w)
    image_tokens: Tensor  # (B, N, D) projected image tokens
    image_positions: Tensor  # (B, N) expanded indices of the image tokens
    positions: Tensor  # (B, L) expanded index of every prompt id
    prompt_hidden: Tensor  # (B, T_prompt, D) last-layer hidden states over the prompt
    generated_hidden: list[Tensor] = field(default_factory=list)  # (B, D) per generated position

    @property
    def hidden_states(self) -> Tensor:
        """``(B, T, D)``: the last-layer hidden state at every expanded position so far."""
        if not self.generated_hidden:
            return self.prompt_hidden
        return torch.cat([self.prompt_hidden, torch.stack(self.generated_hidden, 1)], 1)

    def text_positions(self) -> Tensor:
        """``(B, L + step)``: the expanded index of every text id so far (prompt and generated)."""
        generated = self.prompt_hidden.shape[1] + torch.arange(len(self.generated_hidden), device=self.positions.device)
        return torch.cat([self.positions, generated.expand(self.positions.shape[0], -1)], 1)

    @property
    def last_position(self) -> int:
        """Expanded index of the newest position."""
        return self.prompt_hidden.shape[1] + len(self.generated_hidden) - 1

    def image_hidden_states(self) -> Tensor:
        """``(B, N, D)``: the last hidden state at every image token (from the prompt pass)."""
        index = self.image_positions.unsqueeze(-1).expand(-1, -1, self.prompt_hidden.shape[-1])
        return self.prompt_hidden.gather(1, index)


class DecodingHooks:
    """Plain greedy text generation; a paradigm overrides what it does differently.

    Args:
        logits_processor: ``fn(ids, scores) -> scores`` (a transformers ``LogitsProcessorList``
            works) applied before the argmax; ``ids`` are the text ids so far.
        inputs_embeds_fn: ``fn(embeds (B, 1, D), ids (B, 1)) -> embeds`` applied to the embedding
            of every generated token (the prompt's is given to :func:`greedy_decode`).
    """

    def __init__(
        self,
        *,
        logits_processor: Callable[[Tensor, Tensor], Tensor] | None = None,
        inputs_embeds_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.logits_processor = logits_processor
        self.inputs_embeds_fn = inputs_embeds_fn

    def observe(self, state: DecodingState) -> None:
        """Called after every pass (the prompt's and each step's)."""

    def choose(self, state: DecodingState) -> Tensor:
        """``(B,)`` the next token of every row (finished rows are padded afterwards)."""
        scores = state.scores
        if self.logits_processor is not None:
            scores = self.logits_processor(state.ids, scores)
        return scores.argmax(-1)

    def next_embeds(self, state: DecodingState, token: Tensor, embeds: Tensor) -> Tensor:
        """``(B, 1, D)`` input embeddings of ``token``; ``embeds`` are its token embeddings."""
        if self.inputs_embeds_fn is not None:
            return self.inputs_embeds_fn(embeds, token[:, None])
        return embeds

    def attention_layers(self, token: Tensor | None) -> Sequence[int] | None:
        """Layers whose attention the pass over ``token`` (B,) returns (``None``: none); ``token``
        is ``None`` for the prompt pass."""
        return None

    def final_pass(self, state: DecodingState, token: Tensor) -> bool:
        """Whether to run the model over the last generated ``token`` once more (to observe it)."""
        return False


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor:
    if eos_token_id is None:
        values: list[int] = []
    elif isinstance(eos_token_id, int):
        values = [eos_token_id]
    else:
        values = [int(v) for v in eos_token_id]
    return torch.as_tensor(values, dtype=torch.long, device=device)


@torch.no_grad()
def greedy_decode(
    backbone: Any,
    images: Tensor,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    *,
    hooks: DecodingHooks | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    inputs_embeds_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    references: Any = None,
) -> Tensor:
    """Greedy decoding from left-padded prompts through a splicing backbone.

    Args:
        backbone: a :class:`~vlzoo.backbones.MultimodalBackbone` or
            :class:`~vlzoo.backbones.LlavaBackbone`.
        images: ``(B, 3, S, S)``.
        prompt_ids, prompt_attention_mask: ``(B, L)`` left-padded, one ``<image>`` per row.
        hooks: what differs from plain greedy decoding (see :class:`DecodingHooks`).
        max_new_tokens: most tokens generated per row.
        eos_token_id: id(s) that end a row (default the tokenizer's eos; ``[]`` for none).
        use_cache: keep keys / values (``False`` re-runs the whole sequence every step).
        inputs_embeds_fn: ``fn(text_embeds, ids)`` applied to the prompt's text embeddings
            before splicing (e.g. a box embedding at a prompt ``<loc>``).
        references: the rows' :class:`~vlzoo.structures.References`; their tokens replace the
            prompt's reference placeholders (``backbone.embed_references``).
    Returns:
        ``(B, new_tokens)`` generated ids, pad after a row's eos; decoding stops when every row
        has finished.
    """
    hooks = hooks if hooks is not None else DecodingHooks()
    device = prompt_ids.device
    tok = backbone.tokenizer
    eos = _eos_tensor(tok.eos_token_id if eos_token_id is None else eos_token_id, device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    image_features, image_tokens = backbone.encode_images(images)
    text = backbone.embed_tokens(prompt_ids)
    if hasattr(backbone, "embed_references"):
        text = backbone.embed_references(text, prompt_ids, references, images)
    if inputs_embeds_fn is not None:
        text = inputs_embeds_fn(text, prompt_ids)
    sp = backbone.splice(text, prompt_ids, prompt_attention_mask, image_tokens)
    embeds, mask = sp.embeds, sp.attention_mask
    positions = backbone.position_ids(sp, image_features)  # (B, T), or (3, B, T) for M-RoPE
    # a prefix LM's bidirectional prompt (PaliGemma); generated tokens are causal
    prefix = backbone.bidirectional_prefix(prompt_ids, sp) if hasattr(backbone, "bidirectional_prefix") else None
    cache = None
    if use_cache:
        from transformers import DynamicCache

        cache = DynamicCache(config=backbone._lm().get_decoder().config)
    head = backbone.lm_logits if hasattr(backbone, "lm_logits") else backbone._lm().get_output_embeddings()

    def run(
        step_embeds: Tensor, step_positions: Tensor, layers: Sequence[int] | None, step_prefix: Tensor | None = None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        extra = {} if step_prefix is None else {"prefix": step_prefix}
        hidden, captured = backbone._decode(
            step_embeds, mask, step_positions, past_key_values=cache, attention_layers=layers, **extra
        )
        # the newest query's row, whether the pass covered one position (cache) or all of them
        return hidden, {k: v[:, :, -1] for k, v in captured.items()}

    hidden, attentions = run(embeds, positions, hooks.attention_layers(None), prefix)
    state = DecodingState(
        step=0,
        ids=prompt_ids,
        scores=head(hidden[:, -1]).float(),
        hidden=hidden[:, -1],
        finished=torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device),
        attentions=attentions,
        image_features=image_features,
        image_tokens=image_tokens,
        image_positions=sp.image_positions,
        positions=sp.positions,
        prompt_hidden=hidden,
    )
    hooks.observe(state)
    new_tokens: list[Tensor] = []
    for step in range(max_new_tokens):
        token = hooks.choose(state)
        token = torch.where(state.finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        attended = (~state.finished).to(mask.dtype)[:, None]  # an eos is attended, the pads after it are not
        finished = state.finished | torch.isin(token, eos)
        last = step == max_new_tokens - 1 or bool(finished.all())
        if last and not hooks.final_pass(state, token):
            break
        token_embeds = hooks.next_embeds(state, token, backbone.embed_tokens(token[:, None])).to(embeds.dtype)
        mask = torch.cat([mask, attended], 1)
        next_position = positions[..., -1:] + 1
        positions = torch.cat([positions, next_position], -1)
        step_prefix = None  # one causal query over the cache: every earlier key is visible
        if use_cache:
            step_embeds, step_positions = token_embeds, next_position
        else:
            embeds = torch.cat([embeds, token_embeds], 1)
            step_embeds, step_positions = embeds, positions
            if prefix is not None:
                prefix = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], 1)], 1)
                step_prefix = prefix
        hidden, attentions = run(step_embeds, step_positions, hooks.attention_layers(token), step_prefix)
        state = DecodingState(
            step=step + 1,
            ids=torch.cat([state.ids, token[:, None]], 1),
            scores=head(hidden[:, -1]).float(),
            hidden=hidden[:, -1],
            finished=finished,
            attentions=attentions,
            image_features=image_features,
            image_tokens=image_tokens,
            image_positions=sp.image_positions,
            positions=sp.positions,
            prompt_hidden=state.prompt_hidden,
            generated_hidden=[*state.generated_hidden, hidden[:, -1]],
        )
        hooks.observe(state)
        if last:
            break
    if not new_tokens:
        return prompt_ids.new_zeros(prompt_ids.shape[0], 0)
    return torch.stack(new_tokens, 1)
