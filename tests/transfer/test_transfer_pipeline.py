"""Trans-LoRA (arXiv 2405.17258): label-string scoring per tokenizer, filters, distillation, discriminator files."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transfer_helpers

import lorakit
from lorakit.core.inject import disabled
from lorakit.core.spec import AdapterSpec
from lorakit.data.collate import _encode
from lorakit.data.tasks import Example
from lorakit.transfer import (
    DiscriminatorFileError,
    LabelStringCollator,
    Transfer,
    TransferArgs,
    contrastive_excess_scores,
    label_distribution,
    label_log_scores,
    load_discriminator,
    save_discriminator,
    select,
    train_discriminator,
    train_student,
)
from lorakit.transfer.labels import soft_examples

pair, toy_task = transfer_helpers.pair, transfer_helpers.toy_task  # fixtures (pytest finds them by name)

TEXTS = ["good movie", "bad food", "the day was very nice", "terrible sad day", "love it", "hate this movie",
         "so happy", "awful poor food"]


def _randomize(model, name="default", seed=1, std=0.3):
    from lorakit.core.inject import adapter_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in adapter_modules(model, name).values():
            for p in form.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _teacher(src):
    teacher = copy.deepcopy(src)
    lorakit.attach(teacher, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": 8}), seed=0)
    _randomize(teacher)
    return teacher.eval()


def _dense_scores(model, tok, task, text):
    """Σ_j log p(t_j(y) | prompt, t_<j(y)) from one full forward over prompt + label, per label."""
    prompt = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) else []
    prompt = prompt + _encode(tok, [task.prompt(text)])[0]
    out = []
    for label in task.labels:
        lt = _encode(tok, [" " + label])[0]
        ids = torch.tensor([prompt + lt])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(lt)))
    return out


def test_label_scores_match_dense_recomputation_under_each_tokenizer(pair, toy_task):
    src, stok, tgt, ttok = pair
    task = toy_task
    s_col, t_col = LabelStringCollator(stok, task), LabelStringCollator(ttok, task)
    assert s_col.single and not t_col.single  # word-level: 1 token per label; BPE: several
    assert max(len(t) for t in t_col.label_tokens) > 1
    for model, tok, col in ((src, stok, s_col), (tgt, ttok, t_col)):
        with torch.no_grad():
            got = label_log_scores(model, col(TEXTS))
        want = torch.tensor([_dense_scores(model, tok, task, t) for t in TEXTS], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    probs = label_distribution(tgt, ttok, task, TEXTS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(TEXTS)))


def test_pipeline_end_to_end_across_tokenizers(pair, toy_task, tmp_path):
    src, stok, tgt, ttok = pair
    teacher, target = _teacher(src), copy.deepcopy(tgt)
    task = toy_task
    seeds = [Example(t, "good" if i % 2 == 0 else "bad") for i, t in enumerate(TEXTS[:5])]
    args = TransferArgs(n_candidates=12, keep=6, filter="contrastive_excess", max_new_tokens=6, steps=3,
                        batch_size=4, input_name="Text", seed=0)
    result = Transfer(teacher, stok, target, ttok, task, args).run(seeds, out_dir=tmp_path / "target")
    rep = result.report
    assert rep["n_candidates"] == len(result.candidates) and 0 < rep["n_kept"] <= 6
    assert set(rep["timings"]) == {"generate_s", "filter_s", "label_s", "train_s"}
    # the target adapter lives on the target's layers (its vocabulary), saved as a PEFT folder
    assert (tmp_path / "target" / "adapter_model.safetensors").is_file()
    fresh = copy.deepcopy(tgt)
    lorakit.load(fresh, tmp_path / "target")
    torch.testing.assert_close(label_distribution(fresh, ttok, task, TEXTS),
                               label_distribution(target, ttok, task, TEXTS))
    # teacher labels came from the SOURCE tokenizer's label scoring
    want = label_distribution(teacher, stok, task, [e.text for e in result.kept])
    torch.testing.assert_close(torch.tensor([e.probs for e in result.kept]), want)


def test_discriminator_filter_keeps_what_it_scores_real(pair, toy_task):
    src, stok, tgt, ttok = pair

    def enc(texts):  # bag of two features: "real-looking" words vs "zzz"
        return torch.tensor([[sum(w in ("good", "bad", "movie", "food") for w in t.split()),
                              t.split().count("zzz")] for t in texts], dtype=torch.float32)

    real = ["good movie", "bad food", "good food", "bad movie"] * 3
    fake = ["zzz zzz", "zzz qqq", "qqq zzz zzz", "xxx zzz"] * 3
    disc = train_discriminator(real, fake, kind="embedding", encoder=enc, encoder_name="minilm")
    cands = ["zzz zzz zzz", "good movie", "qqq", "bad food food", "zzz good"]
    p = disc.prob_real(cands)
    assert p[1] > 0.5 and p[3] > 0.5 and p[0] < 0.5
    order = sorted(range(len(cands)), key=lambda i: -float(p[i]))
    assert select(p, 3) == order[:3]
    assert select(p, 0.4) == order[:2]
    assert select(p, 5, threshold=0.5) == [i for i in order if p[i] >= 0.5]
    # through the pipeline: the kept texts are the top-scored candidates
    task = toy_task
    result = Transfer(src, stok, copy.deepcopy(tgt), ttok, task, TransferArgs(filter="discriminator", keep=2, steps=1,
                                                                            batch_size=2),
                      discriminator=disc, generator=lambda seeds, n: list(cands)).run([Example("good", "good")])
    assert [e.text for e in result.kept] == [cands[i] for i in order[:2]]


def test_contrastive_excess_is_expert_minus_amateur_log_likelihood(pair):
    src, stok, _, _ = pair
    teacher = _teacher(src)
    texts = TEXTS[:6]
    got = contrastive_excess_scores(teacher, stok, texts)

    def ll(model, text):  # closed form: mean over tokens 2.. of log p(y_i | y_<i), one text at a time
        ids = torch.tensor([_encode(stok, [text])[0]])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        return logp.gather(-1, ids[0, 1:, None])[:, 0]

    want = []
    for t in texts:
        e = ll(teacher, t)
        with disabled(teacher):
            a = ll(teacher, t)
        want.append(float((e - a).mean()))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    assert select(got, 3) == sorted(range(len(texts)), key=lambda i: -want[i])[:3]


def test_student_moves_toward_teacher_labels(pair, toy_task):
    src, stok, tgt, ttok = pair
    teacher, student = _teacher(src), copy.deepcopy(tgt)
    task = toy_task
    words = ["good", "bad", "nice", "sad", "love", "hate", "movie", "food", "day", "happy", "awful", "fine"]
    g = torch.Generator().manual_seed(0)
    train_texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (3,), generator=g)) for _ in range(48)]
    p_t = label_distribution(teacher, stok, task, train_texts)
    # sharpen the teacher so that "agreement" is well defined
    p_t = F.softmax(torch.log(p_t) * 4, dim=-1)
    data = soft_examples(train_texts, p_t)

    def kl_and_agree():
        q = label_distribution(student, ttok, task, train_texts)
        kl = float((p_t * (p_t.log() - q.log())).sum(-1).mean())
        return kl, float((q.argmax(-1) == p_t.argmax(-1)).float().mean())

    kl0, agree0 = kl_and_agree()
    train_student(student, ttok, task, data, loss="kl", steps=40, batch_size=8, lr=1e-2, seed=0, r=4, alpha=8)
    kl1, agree1 = kl_and_agree()
    assert kl1 < 0.5 * kl0
    assert agree1 > agree0 and agree1 >= 0.9


def test_embedding_discriminator_round_trip_and_corrupt_files(tmp_path):
    def enc(texts):
        return torch.tensor([[len(t), t.count("z"), 1.0] for t in texts], dtype=torch.float32)

    disc = train_discriminator(["good movie", "bad food", "nice day"], ["zzz", "zz zz", "z"], encoder=enc)
    folder = save_discriminator(disc, tmp_path / "adapter")
    assert folder == tmp_path / "adapter" / "trans_lora_discriminator"
    back = load_discriminator(tmp_path / "adapter", encoder=enc)
    texts = ["good", "zzz z", "bad movie"]
    torch.testing.assert_close(back.prob_real(texts), disc.prob_real(texts))
    assert back.info["n_real"] == 3
    (folder / "logreg.safetensors").write_bytes((folder / "logreg.safetensors").read_bytes()[:40])
    with pytest.raises(DiscriminatorFileError, match="corrupt"):
        load_discriminator(folder, encoder=enc)
    save_discriminator(disc, tmp_path / "b")
    meta = tmp_path / "b" / "trans_lora_discriminator" / "discriminator.json"
    meta.write_text(meta.read_text().replace('"dim": 3', '"dim": 4'))
    with pytest.raises(DiscriminatorFileError, match="shapes"):
        load_discriminator(tmp_path / "b", encoder=enc)
    meta.write_text("{not json")
    with pytest.raises(DiscriminatorFileError, match="discriminator.json"):
        load_discriminator(tmp_path / "b", encoder=enc)
    with pytest.raises(DiscriminatorFileError):
        load_discriminator(tmp_path / "nothing-here")


def test_lora_discriminator_round_trip_leaves_source_model_as_it_was(pair, toy_task, tmp_path):
    src, stok, _, _ = pair
    teacher = _teacher(src)
    before = label_distribution(teacher, stok, toy_task, TEXTS)
    disc = train_discriminator(TEXTS[:4], ["zzz qqq", "xxx zzz", "qqq qqq", "zzz"], kind="lora", source_model=teacher,
                               source_tokenizer=stok, steps=4, batch_size=4, r=2, alpha=4)
    p = disc.prob_real(TEXTS)
    torch.testing.assert_close(label_distribution(teacher, stok, toy_task, TEXTS), before)
    assert lorakit.core.inject.active_adapters(teacher) == ("default",)
    save_discriminator(disc, tmp_path / "src")
    back = load_discriminator(tmp_path / "src", source_model=teacher, source_tokenizer=stok)
    torch.testing.assert_close(back.prob_real(TEXTS), p)
    (tmp_path / "src" / "trans_lora_discriminator" / "adapter" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(DiscriminatorFileError, match="corrupt"):
        load_discriminator(tmp_path / "src", source_model=teacher, source_tokenizer=stok)
