"""Multi-token label scoring from one pass over each prompt (AnswerBranches): the same log-likelihoods as a full
forward per prompt and label, with labels that share leading tokens, differ in length or are one token, and with
each prompt run through the model once however many labels there are."""

import pytest
import torch

from conftest import compose_config
from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.scoring import AnswerBranches, label_log_likelihoods
from llmtune.models.loader import load_base_model

FORMAT = PromptFormat("Classify the sentiment.", "{instruction}\n[{input}] =", " {answer}")
TEXTS = ["Operating profit rose to EUR 4 mn", "Net sales fell by 12 percent", "The company is based in Espoo",
         "Orders jumped sharply in the final quarter of the year", "The plant will be closed"]
# Shared leading tokens, one answer the start of another, differing only in the last token, and a one-token answer
ANSWERS = [" positive outlook", " positive outlook ahead", " positive", " negative outlook", " neutral"]


def test_branches_share_the_tokens_answers_have_in_common():
    branches = AnswerBranches([[5, 6, 7], [5, 6, 8], [5, 6], [9], [5, 10, 11, 12]])
    assert branches.branches == [(5, 10, 11), (5, 6)]  # (5,) starts the first branch: no branch of its own
    assert branches.reads[0][0] == branches.reads[1][0] == [3, 4]  # 5 6 7 and 5 6 8 read the same positions
    assert branches.reads[2][0] == [0] and branches.reads[3][0] == [] and branches.reads[4][0] == [0, 1, 2]
    assert branches.targets[4].tolist() == [7, 8]  # after 5 6: both answers' last tokens, normalised once


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer, model = load_base_model(str(tiny_model_dir), compose_config(["model=tiny"]).model)
    assert model.dtype == torch.float32
    return tokenizer, model.eval()


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_one_prompt_pass_gives_each_answer_s_full_forward_log_likelihood(tiny, reuse_prefix):
    tokenizer, model = tiny
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in ANSWERS]
    assert len({len(ids) for ids in answer_ids}) > 1 and answer_ids[0][0] == answer_ids[1][0]
    prompts = [FORMAT.prompt(t) for t in TEXTS]
    scores = label_log_likelihoods(model, tokenizer, prompts, ANSWERS, batch_size=3, reuse_prefix=reuse_prefix)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            prompt_ids = tokenizer(prompt).input_ids
            for j, ids in enumerate(answer_ids):
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float(), -1)
                expected = sum(logp[len(prompt_ids) - 1 + k, token] for k, token in enumerate(ids))
                assert abs(float(scores[i, j]) - float(expected)) < 1e-4, (i, j)


def test_each_prompt_runs_through_the_model_once_however_many_answers(tiny):
    tokenizer, model = tiny
    prompts = [FORMAT.prompt(t) for t in TEXTS[:4]]
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: fed.append(args[0].shape))
    try:
        for answers in (ANSWERS[:2], ANSWERS):
            fed.clear()
            label_log_likelihoods(model, tokenizer, prompts, answers, batch_size=4)
            # the shared instruction, the 4 prompts' own tokens, then every branch of every prompt: 3 forwards
            assert len(fed) == 3 and fed[1][0] == 4, fed
            branches = AnswerBranches([tokenizer(a, add_special_tokens=False).input_ids for a in answers])
            assert fed[2] == (4 * len(branches.branches), branches.width)
    finally:
        hook.remove()


def test_one_token_answers_are_scored_from_fp32_logits_when_the_model_runs_in_bf16(tiny_model_dir):
    """bf16 logits are rounded to 8 bits of mantissa (to a multiple of 1/8 between 16 and 32), so labels tied exactly
    and the first in the list won; the few label rows of the head run in fp32 instead."""
    tokenizer, model = load_base_model(str(tiny_model_dir), compose_config(["model=tiny"]).model)
    model = model.to(torch.bfloat16).eval()
    answers = [" neutral", " negative", " the"]
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    assert all(len(ids) == 1 for ids in answer_ids)
    prompts = [FORMAT.prompt(t) for t in TEXTS]
    scores = label_log_likelihoods(model, tokenizer, prompts, answers, batch_size=1, reuse_prefix=False)
    rows = model.get_output_embeddings().weight[[ids[0] for ids in answer_ids]].float()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            hidden = model.get_decoder()(input_ids=torch.tensor([tokenizer(prompt).input_ids])).last_hidden_state
            expected = torch.log_softmax(hidden[0, -1].float() @ rows.T, -1)
            assert torch.allclose(scores[i], expected, atol=1e-6, rtol=0), (i, scores[i], expected)
