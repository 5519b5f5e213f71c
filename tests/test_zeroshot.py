"""Zero-shot accuracy through lm-evaluation-harness: a tiny local multiple-choice task on the
demo model (scores checked against log-likelihoods computed here with the model itself), the
registry rows, the CLI, the ``--zeroshot`` option of ``prune`` and the messages for missing
data and a missing harness."""
from __future__ import annotations

import json
import sys
from importlib.metadata import version

import pandas as pd
import pytest
import torch

from conftest import tiny_model
from core.cli import build_parser, main
from core.experiments import prune_and_eval
from core.spec import EvaluationSpec, PruneSpec
from core.models import wrap_model
from core.registry import Registry
from core.zeroshot import PAPER_TASKS, task_names, with_accuracy, zeroshot

ITEMS = [  # question, choices, index of the right answer
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a dog have?", ["three", "four", "six"], 1),
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris"], 2),
    ("Which animal says meow?", ["cat", "cow", "duck"], 0),
    ("What do bees make?", ["milk", "honey", "silk"], 1),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus"], 1),
    ("What is two plus two?", ["four", "five", "seven"], 0),
    ("Which season is the coldest?", ["summer", "spring", "winter"], 2),
    ("What do you use to see?", ["eyes", "ears", "hands"], 0),
]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with the task ``tiny_mc`` (10 items, data path relative to the folder) and
    ``broken_mc`` whose data file does not exist."""
    folder = tmp_path_factory.mktemp("tasks")
    with open(folder / "tiny.json", "w") as f:
        for question, choices, label in ITEMS:
            f.write(json.dumps({"question": question, "choices": choices, "label": label}) + "\n")
    (folder / "tiny.yaml").write_text(TASK_YAML.format(name="tiny_mc", data="tiny.json"))
    (folder / "broken.yaml").write_text(TASK_YAML.format(name="broken_mc", data="missing.json"))
    return folder


@pytest.fixture(scope="module")
def harness():
    """lm-evaluation-harness, or the test is skipped (before the demo model is loaded)."""
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install "
                               "'spectrascope[zeroshot]'")


def _loglikelihood(loaded, context: str, continuation: str) -> float:
    """Sum of the log-softmax of the continuation's tokens after the context, computed here."""
    tok = loaded.tokenizer
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    assert whole[:len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = loaded.model(ids).logits[0].double()
    logp = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
    return float(logp.gather(1, ids[0, len(ctx):, None]).sum())


# --- without the harness -------------------------------------------------------------------

def test_zeroshot_options_round_trip_through_the_cli_arguments(task_dir):
    spec = PruneSpec(method="magnitude", evaluation=EvaluationSpec(True, "wiki", 64, zeroshot="boolq, rte",
                                                                   zeroshot_limit=20, task_dir=task_dir))
    assert spec.evaluation.zeroshot == ("boolq", "rte") and spec.evaluation.task_dir == task_dir.resolve()
    argv = spec.to_argv()
    assert argv[argv.index("--zeroshot") + 1] == "boolq,rte"
    assert PruneSpec.from_args(build_parser().parse_args(argv)) == spec
    sweep_args = build_parser().parse_args(["sweep", "--zeroshot", "arc_easy", "--zeroshot-limit", "5"])
    assert PruneSpec.from_args(sweep_args).evaluation.zeroshot == ("arc_easy",)
    with pytest.raises(NotADirectoryError, match="task_dir='.*nowhere': no such folder"):
        EvaluationSpec(zeroshot="boolq", task_dir=task_dir / "nowhere")
    with pytest.raises(ValueError, match="zeroshot_limit=0: give a whole number >= 1"):
        EvaluationSpec(zeroshot="boolq", zeroshot_limit=0)
    assert task_names(",".join(PAPER_TASKS)) == PAPER_TASKS and len(PAPER_TASKS) == 7
    with pytest.raises(ValueError, match="give at least one task name"):
        task_names(" , ")


def test_registry_keeps_zeroshot_rows_and_adds_accuracy_columns(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    a, b = reg.start("eval", model="m"), reg.start("prune", model="m")
    row = dict(stderr=0.1, n=10, harness_version="9.9", limit=10)
    reg.add_zeroshot(a, [dict(task="boolq", metric="acc", value=0.7, **row),
                         dict(task="boolq", metric="acc_norm", value=0.6, **row)])
    reg.add_zeroshot(b, [dict(task="boolq", metric="acc", value=0.5, **row),
                         dict(task="rte", metric="acc", value=0.25, **row)])
    rows = reg.zeroshot([b])
    assert list(rows.columns) == list(Registry.ZEROSHOT_COLUMNS)
    assert rows[["task", "value"]].values.tolist() == [["boolq", 0.5], ["rte", 0.25]]
    assert len(reg.zeroshot()) == 4 and reg.zeroshot([a, b])["limit"].tolist() == [10] * 4
    table = with_accuracy(pd.DataFrame({"run_id": [a, b, 99], "perplexity": [1.0, 2.0, 3.0]}), reg)
    assert table["acc:boolq"].tolist()[:2] == [0.7, 0.5] and pd.isna(table["acc:boolq"].iloc[2])
    assert pd.isna(table["acc:rte"].iloc[0]) and table["acc:rte"].iloc[1] == 0.25


def test_missing_harness_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)        # makes `import lm_eval` fail
    with pytest.raises(ImportError, match=r"install the extra: pip install 'spectrascope\[zeroshot\]'"):
        zeroshot(wrap_model(tiny_model("llama")), "boolq")


# --- with the harness, on the demo model -----------------------------------------------------

@pytest.mark.slow
def test_local_task_scores_match_loglikelihoods_computed_here(harness, demo, task_dir):
    limit = 8
    result = zeroshot(demo, ["tiny_mc"], task_dir=task_dir, limit=limit, device="cpu")
    score = result.task("tiny_mc")
    assert score.n == limit and result.limit == limit and result.harness_version == version("lm_eval")
    assert len(score.loglikelihoods) == limit
    ours = [[_loglikelihood(demo, f"Question: {q}\nAnswer:", " " + c) for c in choices] for q, choices, _ in
            ITEMS[:limit]]
    assert score.loglikelihoods[0] == pytest.approx(ours[0], abs=2e-4)    # one item, every choice
    assert [v for x in score.loglikelihoods for v in x] == pytest.approx([v for x in ours for v in x], abs=2e-4)
    labels = [label for _, _, label in ITEMS[:limit]]
    acc = sum(max(range(len(ll)), key=ll.__getitem__) == y for ll, y in zip(ours, labels)) / limit
    norm = [[v / len(c) for v, c in zip(ll, item[1])] for ll, item in zip(ours, ITEMS)]
    acc_norm = sum(max(range(len(ll)), key=ll.__getitem__) == y for ll, y in zip(norm, labels)) / limit
    assert score.acc == pytest.approx(acc) and score.acc_norm == pytest.approx(acc_norm)
    assert score.stderr["acc"] == pytest.approx((acc * (1 - acc) / (limit - 1)) ** 0.5)   # sample std / sqrt(n)
    assert next(demo.model.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_zeroshot_command_records_an_eval_run(harness, demo, task_dir, capsys):
    code = main(["zeroshot", "--model", "demo", "--tasks", "tiny_mc", "--task-dir", str(task_dir), "--limit", "5",
                 "--device", "cpu", "--json", "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    (task,) = out["tasks"]
    assert task["task"] == "tiny_mc" and task["n"] == 5 and out["limit"] == 5
    assert round(task["acc"] * 5) == pytest.approx(task["acc"] * 5) and 0 <= task["acc"] <= 1
    reg = Registry()
    run = reg.get(out["run_id"])
    assert run["kind"] == "eval" and run["status"] == "done" and run["model_identity"] == demo.identity
    rows = reg.zeroshot([out["run_id"]]).set_index("metric")
    assert set(rows.index) == {"acc", "acc_norm"} and (rows["n"] == 5).all() and (rows["limit"] == 5).all()
    assert rows.loc["acc", "value"] == task["acc"] and rows.loc["acc", "stderr"] == task["acc_stderr"]
    assert (rows["harness_version"] == version("lm_eval")).all()


@pytest.mark.slow
def test_missing_task_data_gives_one_line_saying_what_to_do(harness, demo, task_dir, capsys):
    with pytest.raises(ValueError, match=r"task broken_mc: its data could not be loaded .*--task-dir"):
        zeroshot(demo, "broken_mc", task_dir=task_dir, device="cpu")
    code = main(["zeroshot", "--tasks", "boolq", "--limit", "2", "--device", "cpu", "--quiet"])   # offline
    err = capsys.readouterr().err.strip().splitlines()[-1]     # after the weights' loading bar
    assert code == 2
    assert err.startswith("spectrascope zeroshot: error: task boolq: its data could not be loaded (no network?)")
    assert "give a local task folder with --task-dir" in err
    assert Registry().query(kind="eval")["status"].iloc[-1] == "failed"


@pytest.mark.slow
def test_prune_with_zeroshot_scores_the_pruned_model(harness, demo, task_dir, tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    spec = PruneSpec(method="magnitude", sparsity=0.5, device="cpu",
                     evaluation=EvaluationSpec(zeroshot=("tiny_mc",), zeroshot_limit=4, task_dir=task_dir))
    run = prune_and_eval(spec, demo, registry=reg)
    assert run.perplexity is None and run.zeroshot.task("tiny_mc").n == 4
    rows = reg.zeroshot([run.run_id]).set_index("metric")
    assert rows.loc["acc", "value"] == run.zeroshot.task("tiny_mc").acc
    dense = zeroshot(demo, "tiny_mc", task_dir=task_dir, limit=4, device="cpu")   # the original stays dense
    assert dense.task("tiny_mc").loglikelihoods != run.zeroshot.task("tiny_mc").loglikelihoods
