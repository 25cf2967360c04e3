"""``modules_to_save`` (trainable full copies, e.g. a new classifier head) and ``task_type`` against the real
``peft``: an encoder classifier (tiny ``BertForSequenceClassification``, LoRA on query/value + the
``classifier`` head) round-trips both ways with equal logits and ``task_type`` SEQ_CLS; a bare encoder
(``BertModel``) is written without a task type, which PEFT loads (CAUSAL_LM made PEFT call
``prepare_inputs_for_generation``, which an encoder lacks)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

import lorakit
from lorakit import AdapterSpec
from lorakit.core.inject import SavedModule, saved_modules

try:  # tests/ may or may not be a package
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TOL = 1e-5
SPEC = AdapterSpec(targets=["query", "value"], form_args={"r": 4, "alpha": 8}, modules_to_save=["classifier"])


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, num_labels=3)


def classifier() -> BertForSequenceClassification:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForSequenceClassification(bert_config()).eval()


def encoder() -> BertModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(bert_config()).eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def peft_load(make, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(make(), str(folder)).eval()


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_classifier_with_new_head_loads_in_peft_as_seq_cls(tmp_path):
    model = lorakit.attach(classifier(), SPEC, seed=0)
    assert isinstance(model.classifier, SavedModule)
    randomize_adapter(model, seed=2)
    perturb(saved_modules(model, "default")["classifier"], seed=3)
    ours = logits(model, **batch())
    lorakit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    theirs = peft_load(classifier, tmp_path)
    assert (logits(theirs, **batch()) - ours).abs().max() <= TOL
    # and lorakit reads its own folder back to the same logits
    again = lorakit.load(classifier(), tmp_path)
    assert (logits(again, **batch()) - ours).abs().max() <= TOL


def test_trained_head_copy_round_trips_and_the_original_stays(tmp_path):
    model = lorakit.attach(classifier(), SPEC, seed=0)
    head = model.classifier
    original = {k: v.clone() for k, v in head.base_layer.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.adapters.default.weight", "classifier.adapters.default.bias"} <= trainable
    assert not any("base_layer" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 2, 1])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**batch(), labels=labels).loss.backward()
        opt.step()
    model.eval()
    assert all(torch.equal(head.base_layer.state_dict()[k], v) for k, v in original.items())
    assert (head.adapters["default"].weight - original["weight"]).abs().max() > 1e-3
    ours = logits(model, **batch())
    with lorakit.disabled(model):  # disabled: the original head and no LoRA
        assert (logits(model, **batch()) - logits(classifier(), **batch())).abs().max() <= TOL
    lorakit.save(model, tmp_path)
    assert (logits(peft_load(classifier, tmp_path), **batch()) - ours).abs().max() <= TOL


def test_peft_seq_cls_adapter_loads_in_lorakit(tmp_path):
    torch.manual_seed(1)
    peft_model = get_peft_model(classifier(), LoraConfig(task_type="SEQ_CLS", r=3, lora_alpha=5,
                                                         target_modules=["query", "value"], init_lora_weights=False))
    perturb(peft_model.base_model.model.classifier.modules_to_save["default"], seed=4)
    peft_model.save_pretrained(tmp_path)
    want = logits(peft_model.eval(), **batch())
    state = lorakit.load_state(tmp_path)
    assert state.spec.modules_to_save == ["classifier"]  # PEFT also lists "score", "pre_classifier": absent here
    assert state.meta["task_type"] == "SEQ_CLS"
    model = lorakit.load(classifier(), tmp_path)
    assert (logits(model, **batch()) - want).abs().max() <= TOL
    assert (want - logits(classifier(), **batch())).abs().max() > 1e-3
    lorakit.save(model, tmp_path / "again")  # and back to PEFT, still SEQ_CLS with the head
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (logits(peft_load(classifier, tmp_path / "again"), **batch()) - want).abs().max() <= TOL


def test_bare_encoder_is_saved_without_a_task_type_and_loads_in_peft(tmp_path):
    model = lorakit.attach(encoder(), AdapterSpec(targets=["query", "value"], form_args={"r": 4, "alpha": 8}),
                           seed=0)
    randomize_adapter(model, seed=5)
    ours = logits(model, **batch())
    lorakit.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    assert (logits(peft_load(encoder, tmp_path), **batch()) - ours).abs().max() <= TOL


@pytest.mark.parametrize(("model_class", "task"), [
    ("LlamaForCausalLM", "CAUSAL_LM"), ("GPT2LMHeadModel", "CAUSAL_LM"),
    ("BertForSequenceClassification", "SEQ_CLS"), ("BertForTokenClassification", "TOKEN_CLS"),
    ("BertForQuestionAnswering", "QUESTION_ANS"), ("BertModel", None), ("TinyCNN", None), (None, None)])
def test_task_type_follows_the_model_class(model_class, task):
    from lorakit.io.peft import task_type_for

    assert task_type_for(model_class) == task
