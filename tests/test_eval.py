"""Evaluation: loss against depth from one trajectory equals the model's forward at each depth;
`rdhpc eval` on a DeepSpeed checkpoint and on its export (table, JSON, PNG, TensorBoard); the
lm-evaluation-harness adapter on small local tasks, offline."""

import json
import math

import numpy as np
import pytest
import torch

import trained_runs
from rdhpc.cli import main
from rdhpc.eval.depth_eval import loss_by_depth
from rdhpc.model import IGNORE_INDEX, RecurrentDepthModel, model_config_from_size


def test_one_trajectory_gives_the_forward_loss_at_every_depth():
    torch.manual_seed(0)
    model = RecurrentDepthModel(model_config_from_size("debug")).eval()
    inputs = torch.randint(0, 512, (3, 20))
    labels = torch.randint(0, 512, (3, 20))
    labels[0, :5] = IGNORE_INDEX
    depths = [1, 2, 5, 8]
    swept = loss_by_depth(model, inputs, labels, depths, init_scale=0)
    with torch.no_grad():
        for d in depths:
            loss = model(inputs, num_steps=d, labels=labels, init_scale=0).loss
            total, count = swept[d]
            assert count == 55
            assert total / count == pytest.approx(float(loss), rel=1e-6)
    # a seeded random initial state: the same noise for every depth, as the trainer's validation
    torch.manual_seed(5)
    noisy = loss_by_depth(model, inputs, labels, [3], init_scale=1.0)
    torch.manual_seed(5)
    with torch.no_grad():
        assert noisy[3][0] / 55 == pytest.approx(float(model(inputs, num_steps=3, labels=labels).loss), rel=1e-6)


def test_eval_command_on_a_deepspeed_checkpoint_and_its_export(tmp_path, capsys):
    run = trained_runs.trained_run(12, 1, "fp32")
    data = trained_runs.shards()
    steps = "1,2,4,8,16"
    assert main(["eval", str(run / "checkpoints"), "--data", str(data), "--steps", steps, "--max-rows", "24",
                 "--batch-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "depth      loss   perplexity" in table
    out = run / "eval" / "step00000012"  # the default: RUN/eval/TAG
    result = json.loads((out / "eval.json").read_text())
    assert result["depths"] == [1, 2, 4, 8, 16] and result["step"] == 12 and result["rows"] == 24
    assert 0 < result["tokens"] <= 24 * 64
    for d in ("1", "16"):
        assert result["perplexity"][d] == pytest.approx(math.exp(result["loss"][d]))
    assert (out / "loss_vs_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == \
        [(d, pytest.approx(result["loss"][str(d)], rel=1e-6)) for d in (1, 2, 4, 8, 16)]
    assert [e.step for e in events.Scalars("eval/loss_r8")] == [12]

    # the same numbers from the exported file
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(data), "--steps", steps, "--max-rows", "24",
                 "--out", str(tmp_path / "exported")]) == 0
    again = json.loads((tmp_path / "exported" / "eval.json").read_text())
    assert again["loss"] == result["loss"]


def test_in_loop_validation_equals_the_eval_command(tmp_path, capsys):
    """The trainer's validation (rdhpc.eval.in_loop, through the DeepSpeed engine) and `rdhpc eval`
    of the checkpoint saved at that step compute the same token-weighted losses on the same rows."""
    run = trained_runs.trained_run(12, 1, "fp32", 1)
    assert main(["eval", str(run), "--data", str(trained_runs.shards()), "--steps", "1,2,4,8", "--max-rows", "16",
                 "--batch-size", "4", "--seed", "0", "--out", str(tmp_path / "offline")]) == 0
    offline = json.loads((tmp_path / "offline" / "eval.json").read_text())["loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for depth in (1, 2, 4, 8):  # configs/debug.yaml: eval.depths [1, 2, 4, 8], eval.rows 16
        (event,) = events.Scalars(f"val/loss_r{depth}")
        assert event.step == 12 and event.value == pytest.approx(offline[str(depth)], rel=1e-6)


def test_eval_errors(capsys):
    run = trained_runs.trained_run(12, 1, "fp32")
    assert main(["eval", str(run), "--data", str(trained_runs.shards()), "--steps", "1,zero"]) == 2
    assert "--steps: expected comma-separated integers" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", "/nonexistent/shards", "--steps", "1"]) == 2
    assert "/nonexistent/shards" in capsys.readouterr().err


# ---- lm-evaluation-harness ------------------------------------------------------------------------

TASKS = {
    "rdhpc_local_mc": ("mc.jsonl", [
        {"question": "import os\nimport", "choices": [" sys", " banana", " 7"], "answer": 0},
        {"question": "def main(", "choices": ["):", " the", "%%"], "answer": 0},
        {"question": "for i in", "choices": [" range(", " xyz", " =="], "answer": 1},
        {"question": "return", "choices": [" None", " ((", " 12"], "answer": 0},
    ], """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""),
    "rdhpc_local_rolling": ("rolling.jsonl", [
        {"text": "import os\nimport sys\n\n\ndef main():\n    return 0\n"},
        {"text": "class A:\n    pass\n" * 12},  # longer than the 64-token context: several windows
    ], """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
"""),
    "rdhpc_local_gen": ("gen.jsonl", [{"prompt": "import os\nimport", "target": " sys"}], """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture
def local_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name, (file, rows, body) in TASKS.items():
        (tmp_path / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / file}\n"
            f"test_split: test\n" + body)
    return tmp_path


def test_lm_eval_harness_runs_the_model_at_any_depth(local_tasks):
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from rdhpc.eval.lm_eval_adapter import RdhpcLM

    run = trained_runs.trained_run(12, 1, "fp32")
    lm = RdhpcLM(checkpoint=str(run), num_steps="4", batch_size="3")
    tok, model = lm.tok, lm.model

    def direct_logprob(context, continuation):
        # the harness's split: the context's own tokens, then what the whole text has beyond as many tokens
        context_ids = tok.encode(context).tolist()
        continuation_ids = tok.encode(context + continuation).tolist()[len(context_ids):]
        ids = [tok.bos_id] + context_ids + continuation_ids
        n = len(continuation_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]), num_steps=4, init_scale=0).logits[0].float(), -1)
        return float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1 - n, len(ids) - 1)))

    # the harness's accuracy is the argmax of our direct log-probabilities
    questions = TASKS["rdhpc_local_mc"][1]
    # (the harness puts its target delimiter, one space, between context and choice)
    expected_acc = np.mean([int(np.argmax([direct_logprob(q["question"], " " + c) for c in q["choices"]]) == q["answer"])
                            for q in questions])
    scored = lm.loglikelihood([Instance("loglikelihood", {}, (q["question"], q["choices"][0]), 0) for q in questions])
    for q, (logprob, _) in zip(questions, scored):
        assert logprob == pytest.approx(direct_logprob(q["question"], q["choices"][0]), abs=1e-4)
    short = TASKS["rdhpc_local_rolling"][1][0]["text"]
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)])
    assert rolling == pytest.approx(_whole(model, tok, short), abs=1e-4)

    manager = TaskManager(include_path=str(local_tasks))
    results = {}
    for depth in (1, 4):
        out = lm_eval.simple_evaluate(model="rdhpc", model_args=f"checkpoint={run},num_steps={depth}",
                                      tasks=sorted(TASKS), task_manager=manager, batch_size=4, device="cpu")
        results[depth] = out["results"]
    assert results[4]["rdhpc_local_mc"]["acc,none"] == pytest.approx(expected_acc)
    for depth in (1, 4):
        assert math.isfinite(results[depth]["rdhpc_local_rolling"]["word_perplexity,none"])
        assert results[depth]["rdhpc_local_gen"]["exact_match,none"] in (0.0, 1.0)
    assert results[1]["rdhpc_local_rolling"] != results[4]["rdhpc_local_rolling"]  # the depth is used


def _whole(model, tok, text):
    ids = [tok.bos_id] + tok.encode(text).tolist()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]), num_steps=4, init_scale=0).logits[0].float(), -1)
    return float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())


def test_in_loop_evaluation_leaves_the_training_rng_streams_untouched():
    """Validation noise comes from per-row generators keyed by the row's index, so evaluating never
    draws from a global generator (neither the CPU's nor a GPU's): the training streams go on as if
    nothing ran, and every evaluation sees the same noise."""
    from types import SimpleNamespace

    from rdhpc.data.loader import ShardDataset
    from rdhpc.eval.in_loop import DepthLossEvaluator

    torch.manual_seed(0)
    model = RecurrentDepthModel(model_config_from_size("debug")).eval()
    dataset = ShardDataset(trained_runs.shards(), "val")
    config = SimpleNamespace(depths=[1, 3], rows=8, interval=5)
    evaluator = DepthLossEvaluator(dataset, config, 2, rank=0, world_size=1, device=torch.device("cpu"),
                                   sum_over_ranks=lambda v: v, seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluator.evaluate(model, step=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert evaluator.evaluate(model, step=10).scalars == first.scalars  # the same noise at every evaluation
    assert set(first.scalars) == {"val/loss_r1", "val/loss_r3"}
    assert evaluator.due(5, last=False) and not evaluator.due(6, last=False) and evaluator.due(6, last=True)
    # 8 rows over 3 ranks (3, 3, 2 rows, each padded to 2 batches of 2): summed, the same result
    parts = [DepthLossEvaluator(dataset, config, 2, rank=r, world_size=3, device=torch.device("cpu"),
                                sum_over_ranks=lambda v: v, seed=7) for r in range(3)]
    assert [len(p.indices) for p in parts] == [4, 4, 4] and [p.real_rows for p in parts] == [3, 3, 2]
    from rdhpc.eval.depth_eval import evaluate_depths

    sums = [evaluate_depths(model, dataset.rows(p.indices), [1, 3], dataset.pad_id, 2, seed=7, row_indices=p.indices,
                            real_rows=p.real_rows) for p in parts]
    from rdhpc.eval.depth_eval import validation_indices

    spread = validation_indices(len(dataset), 8)  # the rows evaluated: spread over the whole split
    assert len(spread) == 8 and spread[0] == 0 and spread[-1] >= len(dataset) * 7 // 8 and len(set(spread)) == 8
    whole, tokens = evaluate_depths(model, dataset.rows(spread), [1, 3], dataset.pad_id, 8, seed=7, row_indices=spread)
    assert sum(t for _, t in sums) == tokens
    for depth in (1, 3):
        assert sum(s[depth] for s, _ in sums) / tokens == pytest.approx(whole[depth] / tokens, rel=1e-6)
        assert first.scalars[f"val/loss_r{depth}"] == pytest.approx(whole[depth] / tokens, rel=1e-6)
