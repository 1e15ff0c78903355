"""vlzoo check --dry-run: shipped configs, full-size meta builds, the failure kinds it must catch,
and every GPU recipe and study cell passing it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlzoo.backbones.shipped import (
    ShippedConfigError,
    dry_loading,
    load_pretrained,
    shipped_model,
    shipped_models,
)
from vlzoo.dryrun import dry_run
from vlzoo.study.spec import expand_grid, load_study

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPU = sorted((RECIPES / "gpu").glob("*.yaml"))
#: GPU recipes of families smaller than 7 B: the full size they must build (others: > 7 B)
# full size, per recipe where it is not 7B+: Kosmos-2 1.66 B, PaliGemma-3B 2.92 B
FULL_SIZE = {"pixel2seq_kosmos2_refcoco": 1_600_000_000, "pixel2seq_paligemma_refcoco": 2_900_000_000}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        # the published sizes (LLaMA-7B as the paper counts it; LLaVA-1.5-7B = Vicuna with 64 more rows + CLIP + projector)
        ("lmsys/vicuna-7b-v1.5", "AutoModelForCausalLM", 6_738_415_616),
        ("lmsys/vicuna-13b-v1.5", "AutoModelForCausalLM", 13_015_864_320),
        ("openai/clip-vit-large-patch14-336", "CLIPVisionModel", 303_507_456),
        ("llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", 7_063_427_072),
    ],
)
def test_shipped_configs_build_the_published_sizes_on_meta(name, cls, expected):
    import transformers

    with dry_loading() as record:
        model = load_pretrained(getattr(transformers, cls), name, dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert _count(model) == expected
    assert record.replaced[0][:2] == ("model", name)


def test_llava_13b_is_vicuna_13b_with_the_clip_tower_and_projector():
    import transformers

    with dry_loading():
        llava = load_pretrained(transformers.LlavaForConditionalGeneration, "llava-hf/llava-1.5-13b-hf")
        vicuna = load_pretrained(transformers.AutoModelForCausalLM, "lmsys/vicuna-13b-v1.5")
    extra_rows = 64 * 5120 * 2  # 32064 - 32000 rows of the embedding and of the untied head
    projector = 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert _count(llava) == _count(vicuna) + extra_rows + 303_507_456 + projector


def test_every_hub_name_of_the_recipes_has_a_shipped_config():
    names = set()
    for path in RECIPES.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip().startswith("name_or_path:"):
                names.add(line.split(":", 1)[1].strip())
    assert names and names <= set(shipped_models())


def test_unknown_model_names_what_is_shipped():
    import transformers

    with dry_loading(), pytest.raises(ShippedConfigError, match="llava-hf/llava-1.5-7b-hf"):
        load_pretrained(transformers.AutoModelForCausalLM, "someone/unknown-7b")


def test_sized_tokenizer_keeps_the_family_ids():
    from vlzoo.backbones.shipped import load_pretrained_tokenizer

    with dry_loading():
        tok = load_pretrained_tokenizer("llava-hf/llava-1.5-7b-hf")
    facts = shipped_model("llava-hf/llava-1.5-7b-hf").tokenizer
    assert len(tok) == facts["vocab_size"] + 2
    vocab = tok.get_vocab()
    assert all(vocab[t] == i for t, i in facts["tokens"].items())
    assert tok.pad_token_id == 32001 and tok.eos_token_id == 2
    ids = tok("USER: <image> where is the red circle?", add_special_tokens=False)["input_ids"]
    assert 32000 in ids and tok.unk_token_id not in ids


def test_weight_files_are_not_read_in_a_dry_run(tmp_path):
    from vlzoo.backbones import SamImageEncoder, TimmVisionEncoder
    from vlzoo.decoders import SamMaskDecoder

    missing = str(tmp_path / "sam_vit_b.pth")
    with dry_loading() as record:
        SamMaskDecoder(variant="vit_b", checkpoint=missing)
        SamImageEncoder(variant="tiny", checkpoint=missing)
        encoder = TimmVisionEncoder(model_name="vit_tiny_patch16_224", pretrained=True)
    assert [what for what, _, _ in record.replaced] == ["weights"] * 3
    assert next(encoder.parameters()).device.type == "meta"
    with pytest.raises(FileNotFoundError):
        SamMaskDecoder(variant="tiny", checkpoint=missing)


def test_outside_a_dry_run_nothing_is_replaced(tmp_path):
    import transformers

    with pytest.raises(OSError):
        load_pretrained(transformers.AutoModelForCausalLM, str(tmp_path / "missing"))


# --------------------------------------------------------------------------- failure kinds
def _single(report, key):
    assert not report.ok, report.format()
    keys = [issue.key for issue in report.issues]
    assert key in keys, report.format()
    return report.issues[keys.index(key)]


def test_a_head_sized_for_another_width_names_its_key():
    # a projection of the LM state written for a 32-wide LM, on the 64-wide tiny LM
    report = dry_run(RECIPES / "shapes/pixel2emb_rec.yaml", overrides=["paradigm.box_decoder.hidden_size=32"], predict=False)
    issue = _single(report, "paradigm.box_decoder")
    assert "box_decoder.mlp.0" in issue.message and "hidden_size=32" in issue.message


def test_an_aligner_sized_for_the_tiny_backbone_names_its_key():
    recipe = RECIPES / "gpu/heatmap_refcoco.yaml"
    report = dry_run(recipe, overrides=["paradigm.aligner.hidden_size=64", "paradigm.aligner.vision_dim=64"], predict=False)
    issue = _single(report, "paradigm.aligner")
    assert "Linear" in issue.message and "override paradigm.aligner" in issue.source


def test_a_lora_target_that_matches_nothing_names_its_key():
    report = dry_run(RECIPES / "gpu/pixel2emb_lisa_refcoco.yaml",
                     overrides=["backbone.lora.target_modules=[q_proj,query]"], predict=False)
    issue = _single(report, "backbone.lora.target_modules")
    assert "'query'" in issue.message and "v_proj" in issue.message
    assert report.lora == {"q_proj": 32, "query": 0}


def test_a_lora_target_list_that_matches_nothing_at_all_fails_the_build():
    report = dry_run(RECIPES / "gpu/pixel2emb_lisa_refcoco.yaml",
                     overrides=["backbone.lora.target_modules=[query,value]"], predict=False)
    assert not report.ok and report.issues[0].key.startswith("backbone")


def test_a_special_token_the_tokenizer_already_splits_as_a_word_names_its_key():
    # "mask" is an ordinary Shapes word: as a trigger it would never reach the paradigm as one id
    report = dry_run(RECIPES / "shapes/pixel2emb_lisa_res.yaml",
                     overrides=["paradigm.answer_format.trigger=mask"], predict=False)
    issue = _single(report, "paradigm.answer_format.trigger")
    assert "ordinary word" in issue.message


def _forward_memory(model, batch) -> int:
    """Bytes still allocated after a real CPU forward pass (allocations minus frees recorded by
    torch.profiler): what the forward keeps for backward, plus its small outputs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        total = model.weighted_total(model.loss(batch))
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    total.backward()
    model.zero_grad(set_to_none=True)
    return kept


def test_a_layer_the_language_model_does_not_have_names_its_key():
    report = dry_run(RECIPES / "gpu/attention_keypoints_refcoco.yaml", overrides=["paradigm.attention_layers=[8,40]"],
                     predict=False)
    issue = _single(report, "paradigm.attention_layers")
    assert "32-layer" in issue.message and "override paradigm.attention_layers" in issue.source


def test_the_memory_plan_counts_what_a_real_tiny_model_holds():
    """Parameters, gradients and optimizer state exactly; activations with and without gradient
    checkpointing within 1.25x and 1.5x of what a real CPU forward keeps allocated (torch.profiler)."""
    from vlzoo.build import build
    from vlzoo.memory import optimizer_state_bytes, parameter_bytes

    recipe = RECIPES / "shapes/pixel2emb_rec.yaml"
    overrides = ["data.batch_size=8", "backbone.gradient_checkpointing=true"]
    plan = dry_run(recipe, overrides=overrides, predict=False).memory
    built = build(recipe, overrides=overrides, with_trainer=False)
    model, dm = built.model, built.datamodule
    batch = dm.collate()([dm.train_dataset[i] for i in range(8)])
    model.train()
    with_checkpointing = _forward_memory(model, batch)
    flags = [(m, n) for m in model.modules() for n in ("gradient_checkpointing", "grad_checkpointing")
             if getattr(m, n, None) is True]
    assert flags and plan.gradient_checkpointing
    for module, name in flags:
        setattr(module, name, False)
    without = _forward_memory(model, batch)
    total = model.weighted_total(model.loss(batch))
    total.backward()
    optimizer = model.optimizer_factory([g for g in model.param_groups() if g["params"]])
    optimizer.step()

    real = parameter_bytes(model)
    assert plan.parameters == real["numel"] and plan.trainable == real["trainable_numel"]
    assert plan.parameter_bytes == real["bytes"]
    assert plan.optimizer_bytes == optimizer_state_bytes(optimizer)
    assert dict((item, size) for item, size, _ in plan.rows)["gradients"] == real["trainable_bytes"]
    assert 0.8 <= plan.activations / without <= 1.25, (plan.activations, without)
    kept = plan.activation_count.checkpointed_forward
    # the checkpointed figure is a bound: meta attention and copies keep a little more (measured 1.35x)
    assert 0.8 <= kept / with_checkpointing <= 1.5, (kept, with_checkpointing)
    assert plan.activations_checkpointed < plan.activations


# --------------------------------------------------------------------------- every recipe passes
@pytest.mark.slow
@pytest.mark.parametrize("path", GPU, ids=[p.stem for p in GPU])
def test_every_gpu_recipe_passes_the_dry_run(path):
    report = dry_run(path)
    assert report.ok, report.format()
    assert report.losses and report.predictions > 0
    trainable, total = report.parts[-1][1:]
    assert 0 < trainable < total and total > FULL_SIZE.get(path.stem, 7_000_000_000)
    assert any(what == "model" for what, _, _ in report.replaced)
    assert report.memory is not None and report.memory.total > report.memory.trainable_bytes


@pytest.mark.slow
def test_the_clip_vicuna_backbone_passes_the_dry_run():
    # CausalLM and ClipVisionEncoder from their own shipped configs, LoRA on every LM linear
    report = dry_run(RECIPES / "gpu/pixel2emb_lisa_refcoco.yaml", overrides=["backbone=clip_vicuna7b"], predict=False)
    assert report.ok, report.format()
    assert {name for _, name, _ in report.replaced} >= {"lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"}
    assert all(count == 32 for count in report.lora.values()) and len(report.lora) == 7


def _study_cells():
    seen, out = set(), []
    for study in sorted((RECIPES / "studies").glob("*.yaml")):
        for cell in expand_grid(load_study(study)):
            if not cell.supported:
                continue
            key = (str(cell.recipe), tuple(o for o in cell.overrides if not o.startswith("seed=")))
            if key not in seen:
                seen.add(key)
                out.append(pytest.param(cell.recipe, cell.overrides, id=f"{study.stem}:{cell.group}"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "overrides"), _study_cells())
def test_every_study_cell_passes_the_dry_run(recipe, overrides):
    report = dry_run(recipe, overrides=list(overrides))
    assert report.ok, report.format()


# --------------------------------------------------------------------------- the command line
def test_cli_check_dry_run_and_memory(capsys):
    from vlzoo.cli import EXIT_USER_ERROR, main

    recipe = str(RECIPES / "shapes/pixel2emb_rec.yaml")
    assert main(["check", "--dry-run", recipe, "data.batch_size=2", "data.eval_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "dry run of" in out and ": ok" in out and "memory plan: single" in out and "prediction step" in out
    assert main(["check", "--memory", recipe, "data.batch_size=2", "data.eval_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan:") and "total per GPU" in out
    assert main(["check", "--dry-run", recipe, "data.batch_size=2", "paradigm.box_decoder.hidden_size=32"]) == EXIT_USER_ERROR
    assert "ERROR recipe key paradigm.box_decoder" in capsys.readouterr().out
