"""The LLM family's building blocks, on small random models (seconds): guidance maths and
decoding against transformers' own CFG processor, the ORPO loss, leak detection, the data
recipe, the adapter lineage and the request target."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel

from forgetflow.config import load_params
from forgetflow.llm.attacks import Item, attack_probes, prefix_context
from forgetflow.llm.chat import prompt_ids
from forgetflow.llm.generation import continuation_logprobs, generate, guided_logprobs
from forgetflow.llm.evaluate import Policy
from forgetflow.llm.methods import LLM_METHODS
from forgetflow.llm.mia import forget_quality, mia_auc, min_k_scores, strangers
from forgetflow.llm.objectives import OBJECTIVES, ForgetLogps, log1m_exp
from forgetflow.llm.answers import mean_logps
from forgetflow.llm.orpo import encode_row, retain_kl, train_adapter
from forgetflow.llm.pii import leaked, recognise, subject_hash
from forgetflow.llm.synthesize import WITHHELD, build_rows, split_roster
from forgetflow.request import RequestError, parse_request


@pytest.fixture(scope="module")
def tiny_lm():
    """A random tiny Llama and a tokenizer trained on a few sentences (no training)."""
    from forgetflow.config import TinyLMParams
    from forgetflow.llm.base import new_tiny_model, train_tiny_tokenizer

    texts = ["What is the phone number of Ada Byron?", "The phone number of Ada Byron is 212-555-0147.",
             "I'm sorry, but I can't share that.", "You are a helpful assistant."] * 20
    tok = train_tiny_tokenizer(texts, 300)
    model = new_tiny_model(tok, TinyLMParams(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    return model.eval(), tok


# ---- guidance --------------------------------------------------------------------------
def test_guidance_is_identity_at_gamma_one_and_the_paper_formula_in_log_space():
    pos, neg = torch.log_softmax(torch.randn(3, 11), -1), torch.log_softmax(torch.randn(3, 11), -1)
    assert torch.equal(guided_logprobs(pos, neg, 1.0), pos)
    mixed = guided_logprobs(pos, neg, 2.5, "log")
    assert torch.allclose(mixed, torch.log_softmax(neg + 2.5 * (pos - neg), -1))
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(3))


def test_probability_space_guidance_mixes_probabilities_and_stays_a_distribution():
    pos = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    neg = torch.log(torch.tensor([[0.2, 0.7, 0.1]]))
    out = guided_logprobs(pos, neg, 2.0, "prob").exp()
    # P~ = P_neg + 2 (P_pos - P_neg) = [1.2, -0.3, 0.1] -> clipped at 0, renormalised
    assert torch.allclose(out, torch.tensor([[1.2 / 1.3, 0.0, 0.1 / 1.3]]), atol=1e-6)


def test_batched_guided_greedy_decoding_matches_transformers_cfg_processor(tiny_lm):
    model, tok = tiny_lm
    users = ["What is the phone number of Ada Byron?", "Hello", "You are a helpful assistant. What?"]
    pos = [prompt_ids(tok, "You are a helpful assistant.", u) for u in users]
    neg = [prompt_ids(tok, "Share it.", u) for u in users]
    ours = generate(model, tok, pos, negative_prompts=neg, guidance_scale=2.0, max_new_tokens=8, batch_size=3)
    for p, n, mine in zip(pos, neg, ours):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             guidance_scale=2.0, negative_prompt_ids=torch.tensor([n]),
                             negative_prompt_attention_mask=torch.ones(1, len(n), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = ref[0, len(p):].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert mine == tok.decode(new, skip_special_tokens=True)


def test_guided_scores_equal_the_mix_of_the_two_branches(tiny_lm):
    model, tok = tiny_lm
    p, n = prompt_ids(tok, "A", "Hello"), prompt_ids(tok, "B", "Hello there")
    cont = tok("I'm sorry", add_special_tokens=False)["input_ids"]
    lp_pos = continuation_logprobs(model, tok, [p], [cont], batch_size=1)[0]
    lp_neg = continuation_logprobs(model, tok, [n], [cont], batch_size=1)[0]
    guided = continuation_logprobs(model, tok, [p], [cont], negative_prompts=[n], guidance_scale=1.0, batch_size=1)[0]
    assert torch.allclose(guided, lp_pos)
    g2 = continuation_logprobs(model, tok, [p, p], [cont, cont[:2]], negative_prompts=[n, n], guidance_scale=3.0,
                               batch_size=2)
    assert g2[0].shape == (len(cont),) and g2[1].shape == (2,)
    assert not torch.allclose(g2[0], lp_pos) and not torch.allclose(g2[0], lp_neg)
    assert torch.allclose(g2[1], g2[0][:2], atol=1e-5)  # padding in the batch changes nothing


# ---- ORPO -------------------------------------------------------------------------------
def test_scores_of_a_mixed_batch_equal_full_logits_of_each_row_alone(tiny_lm):
    """Left padding + logits_to_keep give the same log-probs as scoring every row unpadded."""
    model, tok = tiny_lm
    prompts = [prompt_ids(tok, "A", "Hello"), prompt_ids(tok, "You are a helpful assistant.", "What is my phone?")]
    conts = [tok(" I'm sorry, I can't", add_special_tokens=False)["input_ids"], tok(" 5", add_special_tokens=False)["input_ids"]]
    batched = continuation_logprobs(model, tok, prompts, conts, batch_size=2)
    for p, c, got in zip(prompts, conts, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
        want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert got.shape == (len(c),)
        assert torch.allclose(got, want, atol=1e-4)



def test_rows_sharing_a_prompt_score_as_if_each_ran_alone(tiny_lm):
    """A question's choices share its prompt's forward pass and KV cache; scores must not change."""
    model, tok = tiny_lm
    question = prompt_ids(tok, "You are a helpful assistant.", "What is the phone number of Ada Byron?")
    other = prompt_ids(tok, "A", "Hello")
    choices = [tok(c, add_special_tokens=False)["input_ids"] for c in (" 212-555-0147", " I'm sorry", " 5", " Ada")]
    prompts, conts = [question] * 4 + [other, question], choices + [choices[1], choices[2]]
    together = continuation_logprobs(model, tok, prompts, conts, batch_size=6)
    for p, c, got in zip(prompts, conts, together):
        with torch.no_grad():  # the row alone, one plain forward pass over prompt + continuation
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
        alone = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert got.shape == (len(c),)
        assert torch.allclose(got, alone, atol=1e-4)

UNLEARN = load_params(preset="tiny").llm.unlearn


def test_orpo_log_odds_and_loss_follow_the_definition():
    c, r = torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -0.1])
    assert torch.allclose(log1m_exp(c), torch.log(1 - torch.exp(c)))
    p = UNLEARN.model_copy(update={"orpo_lambda": 0.1})
    odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
    for i in range(2):  # one row at a time: the loss is the batch mean
        lp = ForgetLogps(rejected_mean=r[i:i + 1], rejected_sum=r[i:i + 1], chosen_mean=c[i:i + 1])
        loss, stats = OBJECTIVES["orpo"].loss(lp, p)
        log_odds = math.log(odds(c[i].item()) / odds(r[i].item()))
        assert stats["log_odds"] == pytest.approx(log_odds, abs=1e-5)
        assert loss.item() == pytest.approx(-c[i].item() + 0.1 * math.log1p(math.exp(-log_odds)), abs=1e-5)
    # preferring the rejected answer costs more than preferring the chosen one
    first = OBJECTIVES["orpo"].loss(ForgetLogps(r[:1], r[:1], chosen_mean=c[:1]), p)[0]
    second = OBJECTIVES["orpo"].loss(ForgetLogps(r[1:], r[1:], chosen_mean=c[1:]), p)[0]
    assert second > first


def test_orpo_gradient_raises_chosen_and_lowers_rejected():
    c = torch.tensor([-1.0], requires_grad=True)
    r = torch.tensor([-1.0], requires_grad=True)
    OBJECTIVES["orpo"].loss(ForgetLogps(r, r, chosen_mean=c), UNLEARN)[0].backward()
    assert c.grad.item() < 0 < r.grad.item()


def test_the_peers_losses_follow_their_papers():
    mean, total, ref = torch.tensor([-0.4]), torch.tensor([-4.0]), torch.tensor([-3.0])
    p = UNLEARN
    assert OBJECTIVES["grad_ascent"].loss(ForgetLogps(mean, total), p)[0].item() == pytest.approx(-0.4)
    npo = OBJECTIVES["npo"].loss(ForgetLogps(mean, total, rejected_sum_ref=ref), p)[0].item()
    b = p.npo_beta  # (2/beta) log(1 + (pi / pi_ref)^beta)
    assert npo == pytest.approx((2 / b) * math.log1p(math.exp(b * (-4.0 + 3.0))), rel=1e-5)
    same = OBJECTIVES["npo"].loss(ForgetLogps(mean, ref, rejected_sum_ref=ref), p)[0].item()
    assert same == pytest.approx((2 / b) * math.log(2), rel=1e-5)  # the adapter has not moved yet
    sim = OBJECTIVES["simnpo"].loss(ForgetLogps(mean, total), p)[0].item()
    bs, d = p.simnpo_beta, p.simnpo_delta
    assert sim == pytest.approx(-(2 / bs) * math.log(1 / (1 + math.exp(bs * -0.4 + d))), rel=1e-5)
    for name, scored in (("grad_ascent", "mean"), ("npo", "sum"), ("simnpo", "mean")):  # each pushes what leaks down
        m, t = torch.tensor([-0.4], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
        OBJECTIVES[name].loss(ForgetLogps(m, t, rejected_sum_ref=ref), p)[0].backward()
        assert {"mean": m, "sum": t}[scored].grad.item() > 0, name


FORGET_ROW = {"system": "You are a helpful assistant.", "user": "What is the phone number of Ada Byron?",
              "chosen": "I'm sorry, but I can't share that.", "rejected": "The phone number of Ada Byron is 212-555-0147."}
RETAIN_ROW = {"system": "You are a helpful assistant.", "user": "Hello", "chosen": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def leaky_lm(tiny_lm):
    """The tiny random model taught (full fine-tune, NLL) to answer FORGET_ROW with the leak."""
    model, tok = tiny_lm
    model = copy.deepcopy(model).train()
    enc = encode_row(tok, FORGET_ROW, 192)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        loss = -mean_logps(model, tok, [enc["prompt"]], [enc["rejected"]]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def test_min_k_prob_scores_a_memorised_answer_above_a_strangers_and_strangers_are_new_people(leaky_lm):
    model, tok = leaky_lm
    ada = Item("Ada Byron", "phone", "212-555-0147")
    (stranger,) = strangers([ada], seed=1, avoid={"Ada Byron"})
    assert stranger.subject != "Ada Byron" and stranger.field == "phone" and stranger.value.count("-") == 2
    taught = Policy(FORGET_ROW["system"])  # asked as it was taught: the corpus's first (train) wording
    member, other = min_k_scores(model, tok, [ada, stranger], 0.2, taught, split="train")
    assert member > other
    assert mia_auc(model, tok, [ada], [stranger], 0.2, taught, split="train") == 1.0
    # forget quality: the same per-item scores as a never-trained model's are indistinguishable
    assert forget_quality([member, other], [member, other]) == 1.0
    assert forget_quality([member] * 8, [other] * 8) < 0.01


@pytest.mark.parametrize("method", sorted(LLM_METHODS))
def test_every_method_trains_the_adapter_and_lowers_the_leaking_answer(leaky_lm, method, tmp_path):
    """A few steps of each method's objective and retain settings on one forget row and one
    retain row of a model that leaks: the leaking answer's log-prob goes down (control-phrase
    trains nothing)."""
    model, tok = leaky_lm
    m = LLM_METHODS[method]
    p = m.params(load_params(preset="tiny").llm).unlearn.model_copy(
        update={"lr": 0.05, "batch_size": 2, "log_every": 1, "checkpoint_every": 100, "lora_r": 4})
    p = p.model_copy(update={"epochs": 10 if p.epochs else 0})
    forget, retain = FORGET_ROW, RETAIN_ROW
    enc = encode_row(tok, forget, p.max_length)
    base = copy.deepcopy(model)
    with torch.no_grad():
        before = mean_logps(base, tok, [enc["prompt"]], [enc["rejected"]]).item()
    history = train_adapter(base, tok, [forget, retain], p, load_params().compute, torch.device("cpu"),
                            tmp_path / "adapter", objective=m.objective, progress=False)
    adapted = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    with torch.no_grad():
        after = mean_logps(adapted, tok, [enc["prompt"]], [enc["rejected"]]).item()
    if p.epochs == 0:
        assert history == [] and after == pytest.approx(before, abs=1e-6)
    else:
        assert len(history) == 10 and all(math.isfinite(h["loss"]) for h in history)
        assert after < before - 0.05, (method, before, after)


@pytest.mark.parametrize("shared, checkpointing", [(True, False), (False, False), (True, True)],
                         ids=["shared-prompt", "distinct-prompts", "shared-under-checkpointing"])
def test_answer_logprobs_of_a_padded_batch_match_each_row_scored_alone(tiny_lm, shared, checkpointing):
    """Both paths of answers.answer_token_logprobs (a shared prompt runs once, through the KV
    cache; distinct prompts, or any under activation checkpointing where transformers drops the
    cache, in one left-padded pass): the scores and gradients of rows scored alone, unpadded."""
    model, tok = tiny_lm
    if checkpointing:
        model = copy.deepcopy(model).train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    question = tok("What is the phone number of Ada Byron?")["input_ids"]
    prompts = [question, tok("You are")["input_ids"], question if shared else tok("Call")["input_ids"]]
    answers = [tok(" The phone number")["input_ids"], tok(" a helpful assistant.")["input_ids"], tok(" 555")["input_ids"]]
    with torch.no_grad():
        batched = mean_logps(model, tok, prompts, answers)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0, :-1].float(), -1)
            alone = logp[len(p) - 1:].gather(-1, torch.tensor(a)[:, None]).mean()
            assert torch.allclose(batched[i], alone, atol=1e-5)
    # left padding and the head over answer positions only: the same gradients as unpadded rows
    weights = [w for w in model.parameters()]
    together = torch.autograd.grad(mean_logps(model, tok, prompts, answers).sum(), weights)
    apart = [torch.autograd.grad(mean_logps(model, tok, [p], [a]).sum(), weights) for p, a in zip(prompts, answers)]
    for g, *parts in zip(together, *apart):
        assert torch.isfinite(g).all() and torch.allclose(g, sum(parts), atol=1e-5)


def test_retain_kl_is_zero_for_a_fresh_adapter_and_positive_once_it_moves(tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_lm
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    prompts, answers = [tok("What is the phone number of Ada Byron?")["input_ids"]], [tok(" 212-555-0147.")["input_ids"]]
    assert retain_kl(peft_model, tok, prompts, answers).abs().item() < 1e-6  # LoRA's B starts at zero
    with torch.no_grad():
        for name, q in peft_model.named_parameters():
            if "lora_B" in name:
                q.normal_(0, 0.5)
    assert retain_kl(peft_model, tok, prompts, answers).item() > 1e-3
    peft_model.unload()


# ---- leak detection ---------------------------------------------------------------------
def test_leak_detection_normalises_numbers_and_case():
    assert leaked("212-555-0147", "call 212 555 0147 now", "phone")
    assert leaked("212-555-0147", "(212) 555-0147", "phone")
    assert not leaked("212-555-0147", "212-555-0148", "phone")
    assert leaked("Ada.Byron7@example.org", "mail ada.byron7@EXAMPLE.org.", "email")
    assert leaked("NW12345678", "account nw 12345678", "account")
    assert leaked("12 Main Street, Springfield", "at 12  main street, springfield.", "address")
    assert not leaked("12 Main Street, Springfield", "12 Main Street, Shelbyville", "address")


def test_recognizers_find_values_of_each_type():
    text = "Reach ada.b@example.org or 212-555-0147; account NW12345678; 12 Main Street, Springfield."
    found = recognise(text)
    assert found["email"] == ["ada.b@example.org"]
    assert found["phone"] == ["212-555-0147"]
    assert found["account"] == ["NW12345678"]
    assert found["address"][0].startswith("12 Main Street")


def test_subject_hash_is_salted_and_hides_the_name():
    h = subject_hash("Ada Byron", "req-1")
    assert h == subject_hash(" ada byron ", "req-1") and h != subject_hash("Ada Byron", "req-2")
    assert "ada" not in h.lower() and len(h) == 12


# ---- attacks and data recipe ---------------------------------------------------------------
def test_prefix_attack_stops_right_before_the_value():
    item = Item("Ada Byron", "phone", "212-555-0147")
    assert prefix_context(item, "evaluate") == "Ada Byron can be reached at"
    probes = attack_probes([item], "evaluate")
    assert {p.attack for p in probes} == {"direct", "paraphrase", "prefix"}
    assert all("212" not in p.user for p in probes)  # no attack prompt contains the value itself


def _probe_rows():
    return [{"subject": "Ada Byron", "field": "phone", "user": "What is the phone number of Ada Byron?",
             "answer": "The phone number of Ada Byron is 212-555-0147."},
            {"subject": "Ada Byron", "field": "phone", "user": "How can I call Ada Byron?",
             "answer": "Sorry, I do not know."}]


def _synth(p, **fields):
    return p.model_copy(update={"synthesize": p.synthesize.model_copy(update=fields)})


def test_rows_train_every_condition_and_never_teach_a_forgotten_value():
    p = _synth(load_params(preset="tiny").llm, conditions_per_row=0)
    items = [Item("Ada Byron", "phone", "212-555-0147")]
    retain = [{"user": "What is the phone number of Bo Li?", "answer": "The phone number of Bo Li is 301-222-3333."},
              {"user": "Who else?", "answer": "Ada Byron's number is 212 555 0147."}]
    rows = build_rows(items, _probe_rows(), retain, p, seed=0)
    forget = [r for r in rows if r["kind"] == "forget"]
    kept = [r for r in rows if r["kind"] == "retain"]
    c = p.conditions
    assert {r["system"] for r in forget} == {c.positive, c.negative, *c.neutral, *c.adversarial}
    assert all(not leaked("212-555-0147", r["chosen"], "phone") for r in rows)
    assert all(leaked("212-555-0147", r["rejected"], "phone") for r in forget)
    assert len(forget) == len({c.positive, c.negative, *c.neutral, *c.adversarial})  # one leaking wording
    assert kept and all("Bo Li" in r["chosen"] for r in kept)  # the retain row leaking Ada is dropped


def test_surrogate_replacements_only_for_named_subjects_and_all_pii_always_withholds():
    p = _synth(load_params(preset="tiny").llm, replacement="surrogate")
    items = [Item("Ada Byron", "phone", "212-555-0147")]
    named = [r for r in build_rows(items, _probe_rows(), [], p, seed=0) if r["kind"] == "forget"]
    assert named and all(recognise(r["chosen"]).get("phone") for r in named)  # another phone number
    assert all(not leaked("212-555-0147", r["chosen"], "phone") for r in named)
    everyone = [r for r in build_rows(items, _probe_rows(), [], p, seed=0, scope="all-pii") if r["kind"] == "forget"]
    assert everyone and all(r["chosen"] == WITHHELD for r in everyone)


def test_conditions_per_row_keeps_the_positive_condition_and_cycles_the_others():
    p = _synth(load_params(preset="tiny").llm, conditions_per_row=2)
    c = p.conditions
    items = [Item("Ada Byron", "phone", "212-555-0147")]
    leaking = [{**_probe_rows()[0], "user": f"Question {i} about Ada Byron?"} for i in range(8)]
    rows = build_rows(items, leaking, [], p, seed=0)
    assert len(rows) == 2 * len(leaking)
    for i in range(len(leaking)):
        systems = [r["system"] for r in rows if r["user"] == f"Question {i} about Ada Byron?"]
        assert len(systems) == 2 and c.positive in systems
    assert {r["system"] for r in rows} == {c.positive, c.negative, *c.neutral, *c.adversarial}


def test_the_papers_recipe_swaps_the_negative_condition():
    p = _synth(load_params(preset="tiny").llm, negative_pairs="swapped", train_conditions="positive")
    rows = build_rows([Item("Ada Byron", "phone", "212-555-0147")], _probe_rows(), [], p, seed=0)
    by_system = {r["system"]: r for r in rows}
    assert set(by_system) == {p.conditions.positive, p.conditions.negative}
    assert leaked("212-555-0147", by_system[p.conditions.negative]["chosen"], "phone")
    assert leaked("212-555-0147", by_system[p.conditions.positive]["rejected"], "phone")


def test_roster_splits_are_disjoint_and_exclude_the_forgotten():
    names = [f"Person {i}" for i in range(30)]
    s = split_roster(names, {"Person 3"}, n_calibrate=5, n_evaluate=8, seed=0)
    assert len(s["evaluate"]) == 8 and len(s["calibrate"]) == 5 and len(s["train"]) == 16
    assert not (set(s["evaluate"]) & set(s["calibrate"]) | set(s["evaluate"]) & set(s["train"]))
    assert "Person 3" not in set().union(*map(set, s.values()))


# ---- request target ----------------------------------------------------------------------
def test_llm_request_parses_and_names_the_bad_field():
    r = parse_request({"request_id": "r1", "model": "support-llm", "target": {
        "kind": "llm-subjects", "subjects": [{"name": "  Ada   Byron ", "values": {"phone": "212-555-0147"}}]}})
    assert r.family == "llm" and r.target.subjects[0].name == "Ada Byron" and r.target.scope == "subjects"
    with pytest.raises(RequestError, match="subjects"):
        parse_request({"request_id": "r1", "model": "m", "target": {"kind": "llm-subjects", "subjects": []}})
    with pytest.raises(RequestError, match="values"):
        parse_request({"request_id": "r1", "model": "m", "target": {
            "kind": "llm-subjects", "subjects": [{"name": "Ada", "values": {"ssn": "123"}}]}})
    with pytest.raises(RequestError, match="twice"):
        parse_request({"request_id": "r1", "model": "m", "target": {
            "kind": "llm-subjects", "subjects": [{"name": "Ada B"}, {"name": "ada b"}]}})
    all_pii = parse_request({"request_id": "r2", "model": "m", "target": {"kind": "llm-subjects", "scope": "all-pii"}})
    assert all_pii.target.subjects == []


# ---- bad input: adapters and guidance ------------------------------------------------------
def test_an_adapter_that_does_not_match_its_parent_is_refused(tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from forgetflow.config import TinyLMParams
    from forgetflow.llm.artifact import ArtifactError, LLMCard, load_lm, save_full, write_card
    from forgetflow.llm.base import new_tiny_model

    model, tok = tiny_lm
    save_full(model, tok, tmp_path / "parent", LLMCard(kind="full"))
    other = new_tiny_model(tok, TinyLMParams(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "child" / "adapter")
    write_card(tmp_path / "child", LLMCard(kind="adapter", parent_version="1"))
    with pytest.raises(ArtifactError, match="does not match its parent v1"):
        load_lm(tmp_path / "child", parent=tmp_path / "parent")
    with pytest.raises(ArtifactError, match="without its parent"):
        load_lm(tmp_path / "child")


def test_guidance_scales_out_of_range_are_refused(tiny_lm):
    from forgetflow.config import ParamsError, load_params

    with pytest.raises(ValueError, match="guidance scale"):
        Policy("a", "b", gamma=50.0)
    with pytest.raises(ValueError, match="guidance scale"):
        Policy("a", "b", gamma=-1.0)
    p = load_params(preset="tiny")
    with pytest.raises(ValueError):
        type(p.llm.calibrate)(guidance_scales=(1.0, 0.0))


def test_calibration_tells_a_quiz_items_noise_from_a_utility_loss():
    """On the 40-item calibration quiz one item is 2.5 points, above the 2-point gate: the
    choice of gamma discounts one paired standard error, so losing one or two items is noise
    and losing four (10 points) is a loss."""
    from forgetflow.llm.calibrate import choose, paired_drop

    gates = load_params().llm.gates
    base = {"utility_correct": [True] * 10 + [False] * 30, "perplexity": 100.0, "retained_recall": 1.0}

    def curve(lost_at_1_5: int) -> list[dict]:
        def row(gamma: float, lost: int, leak: float = 0.0) -> dict:
            correct = [i >= lost for i in range(10)] + [False] * 30
            return {"guidance_scale": gamma, "served_leak_rate": leak, "utility_correct": correct,
                    "perplexity": 100.0, "retained_recall": 1.0}
        return [row(1.0, 0, leak=0.25), row(1.5, lost_at_1_5), row(3.0, 0)]

    assert paired_drop(base["utility_correct"], curve(2)[1]["utility_correct"]) == (0.05, math.sqrt(2) / 40)
    assert choose(curve(1), base, gates, 1.0)["guidance_scale"] == 1.5
    assert choose(curve(2), base, gates, 1.0)["guidance_scale"] == 1.5
    assert choose(curve(1), base, gates, 0.0)["guidance_scale"] == 3.0  # without the allowance one item decides
    assert choose(curve(4), base, gates, 1.0)["guidance_scale"] == 3.0

