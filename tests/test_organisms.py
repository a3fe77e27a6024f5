"""The shipped organisms: loadable with plain transformers, behaviour on held-out prompts, recipes reproducible."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import interplab as il
from interplab.experiments.behaviour import behaviour as measure
from interplab.organisms.recipes import WEIGHTS, train_stage

STAGES = ("base", "sft", "dpo")


@pytest.fixture(scope="module")
def behaviour():
    return {stage: measure(il.load(f"interplab/tiny-{stage}")) for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_shipped_weights_are_plain_hugging_face_under_5mb(stage):
    folder = WEIGHTS / f"tiny-{stage}"
    assert (folder / "model.safetensors").stat().st_size < 5e6
    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert hf.config.model_type == "gpt2"
    assert (folder / "tokenizer.json").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_base_tasks_hold_at_every_stage(behaviour, stage):
    b = behaviour[stage]
    assert b["induction_top1"] >= 0.9, b
    assert b["ioi_positive"] >= 0.9, b
    assert b["greater_than_mass"] >= 0.8, b
    assert b["facts_top1"] >= 0.9, b


def test_sft_installs_the_cue_triggered_register(behaviour):
    assert behaviour["sft"]["register_with_cue"] >= 0.9
    assert behaviour["sft"]["register_without_cue"] <= 0.1
    assert behaviour["base"]["register_with_cue"] <= 0.1  # base never saw the formal words as answers


def test_dpo_prefers_truth_where_sft_prefers_the_misconception(behaviour):
    assert behaviour["sft"]["truth_preferred_heldout"] <= 0.5
    assert behaviour["dpo"]["truth_preferred_heldout"] >= 0.9


@pytest.mark.parametrize("stage", STAGES)
def test_recipe_is_deterministic(stage):
    parent = None if stage == "base" else AutoModelForCausalLM.from_pretrained(WEIGHTS / f"tiny-{'base' if stage == 'sft' else 'sft'}")
    first, _, _ = train_stage(stage, parent=parent, steps=3)
    second, _, _ = train_stage(stage, parent=parent, steps=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    if parent is not None:  # the three steps did change the parent
        assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), parent.state_dict().values()))
