"""A zero-shot task folder is data (issue 18, part 3) and ``--zeroshot`` is checked before any
work (part 5): Python hooks (``!function``, ``class``, HF Evaluate metric scripts), also through
``include``, are refused in one line before the model is loaded unless ``--trust-task-code``;
Jinja templates that reach Python internals are refused, and every template renders in Jinja's
sandbox; a missing harness or an unknown task fails in one line before any model loading.
Each payload would create a marker file: the tests check that it does not exist."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from core.cli import main as cli
from core.registry import Registry
from core.spec import EvaluationSpec

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [("What color is the sky?", ["blue", "green"], 0), ("How many legs does a dog have?", ["three", "four"], 1),
         ("Which animal says meow?", ["cat", "cow"], 0)]
TASK = """task: my_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: {text}
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
{extra}"""
SAFE_TEXT = '"Question: {{question}}\\nAnswer:"'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random llama with a byte-level tokenizer (loads in a second, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def _task_dir(root: Path, text: str = SAFE_TEXT, extra: str = "", files: dict[str, str] | None = None) -> Path:
    """``root/tasks``: ``my_arc.yaml`` (3 items in ``items.jsonl``) and ``files`` (name: text)."""
    folder = root / "tasks"
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                                                for q, c, y in ITEMS))
    (folder / "my_arc.yaml").write_text(TASK.format(text=text, extra=extra))
    for name, content in (files or {}).items():
        (folder / name).write_text(content)
    return folder


def _payload(marker: Path, *defs: str) -> str:
    """Python that creates ``marker`` when imported, then defines ``defs``."""
    return f"open({str(marker)!r}, 'w').write('ran')\n" + "\n".join(defs) + "\n"


EVIL_DEFS = ("def doc_to_text(doc):\n    return doc['question']",
             "def process_docs(ds):\n    return ds",
             "def process_results(doc, results):\n    return {'acc': 1.0}",
             "def keep(resps, docs):\n    return resps",
             "class MyTask:\n    pass")
HOOKS = {   # name: (extra YAML or a replaced doc_to_text, other files, what the message names)
    "doc_to_text": ("doc_to_text: !function evil.doc_to_text", {}, "!function evil.doc_to_text"),
    "process_docs": ("process_docs: !function evil.process_docs", {}, "!function evil.process_docs"),
    "include": ("include: base.yaml", {"base.yaml": "process_results: !function evil.process_results\n"},
                "!function evil.process_results"),
    "filter": ("filter_list:\n  - name: f\n    filter:\n      - function: custom\n        filter_fn: "
               "!function evil.keep", {}, "!function evil.keep"),
    "class": ("class: !function evil.MyTask", {}, "!function evil.MyTask"),
    "hf_evaluate": ("metric_list:\n  - metric: evil_metric.py\n    hf_evaluate: true", {}, "evil_metric.py"),
}


def _hook_dir(tmp_path: Path, hook: str) -> tuple[Path, Path, str]:
    marker = tmp_path / "marker"
    extra, files, names = HOOKS[hook]
    text = SAFE_TEXT
    if extra.startswith("doc_to_text:"):
        text, extra = extra.partition(": ")[2], ""
    task = TASK.format(text=text, extra="")
    if extra.startswith("metric_list:"):   # replaces the task's metric list
        task = task[:task.index("metric_list:")] + extra + "\nmetadata:\n  version: 1.0\n"
        extra = ""
    files = {**files, "evil.py": _payload(marker, *EVIL_DEFS),
             "evil_metric.py": _payload(marker, "import evaluate", "class EvilMetric(evaluate.Metric):\n    pass")}
    folder = _task_dir(tmp_path, files=files)
    (folder / "my_arc.yaml").write_text(task + extra + "\n")
    return folder, marker, names


def _runs() -> int:
    return len(Registry().query(status=None))


def _refused(capsys, argv: list[str], *names: str, seconds: float = 20.0) -> str:
    """Runs the CLI: exit 2, one stderr line naming ``names``, no run recorded, fast."""
    before, start = _runs(), time.perf_counter()
    rc = cli(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    for name in names:
        assert name in err[0], err[0]
    assert _runs() == before, "a run was recorded: the refusal came after the work started"
    assert took < seconds
    return err[0]


def _commands(model: Path, folder: Path, task: str = "my_arc") -> dict[str, list[str]]:
    common = ["--model", str(model), "--device", "cpu", "--quiet"]
    return {"zeroshot": ["zeroshot", *common, "--tasks", task, "--task-dir", str(folder), "--limit", "2"],
            "prune": ["prune", *common, "--method", "magnitude", "--sparsity", "0.5", "--zeroshot", task,
                      "--zeroshot-limit", "2", "--task-dir", str(folder)],
            "sweep": ["sweep", *common, "--methods", "magnitude", "--allocations", "uniform", "--sparsities", "0.5",
                      "--zeroshot", task, "--zeroshot-limit", "2", "--task-dir", str(folder),
                      "--out", str(folder.parent / "sweep")]}


# --- Python hooks ----------------------------------------------------------------------------

@pytest.mark.parametrize("hook", list(HOOKS))
def test_python_hook_in_a_task_folder_is_refused_before_the_model_loads(hook, model_dir, tmp_path, capsys):
    folder, marker, names = _hook_dir(tmp_path, hook)
    line = _refused(capsys, _commands(model_dir, folder)["zeroshot"], names, "--trust-task-code")
    assert "include" not in hook or "base.yaml" in line
    assert "my_arc.yaml" in line or "base.yaml" in line
    assert not marker.exists(), "the task folder's Python code ran"


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_prune_and_sweep_refuse_a_hook_before_any_work(command, model_dir, tmp_path, capsys):
    folder, marker, names = _hook_dir(tmp_path, "doc_to_text")
    _refused(capsys, _commands(model_dir, folder)[command], "my_arc.yaml", names, "--trust-task-code")
    assert not marker.exists() and not (tmp_path / "sweep.csv").exists()


def test_the_spec_refuses_a_hook_for_every_route(tmp_path):
    """The dashboard and the library build a spec: it refuses an untrusted folder too, and
    ``trust_task_code`` goes through the command line the dashboard's jobs run."""
    from core.cli import build_parser
    from core.spec import PruneSpec

    folder, marker, _ = _hook_dir(tmp_path, "process_docs")
    with pytest.raises(ValueError, match=r"my_arc\.yaml.*!function evil\.process_docs"):
        EvaluationSpec(zeroshot="my_arc", task_dir=folder)
    spec = PruneSpec(method="magnitude", evaluation=EvaluationSpec(zeroshot="my_arc", task_dir=folder,
                                                                   trust_task_code=True))
    argv = spec.to_argv()
    assert "--trust-task-code" in argv and PruneSpec.from_args(build_parser().parse_args(argv)) == spec
    assert not marker.exists()


# --- templates -------------------------------------------------------------------------------

TEMPLATES = {
    "getattr": "\"{{{{ cycler.__init__.__globals__.os.system('touch {m}') }}}}\"",
    "getitem": "\"{{{{ cycler['__init__']['__globals__']['os'].system('touch {m}') }}}}\"",
    "attr_filter": "\"{{{{ (joiner|attr('__init__')|attr('__globals__')).os.system('touch {m}') }}}}\"",
    "statement": "\"{{% set g = lipsum.__globals__ %}}{{{{ g.os.system('touch {m}') }}}}\"",
}


@pytest.mark.parametrize("form", list(TEMPLATES))
def test_template_reaching_python_internals_is_refused_before_the_model_loads(form, model_dir, tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = _task_dir(tmp_path, text=TEMPLATES[form].format(m=marker))
    _refused(capsys, _commands(model_dir, folder)["zeroshot"], "my_arc.yaml", "doc_to_text", "__")
    assert not marker.exists(), "the template's payload ran"


def test_templates_render_sandboxed(model_dir, tmp_path, capsys):
    """Attribute names taken from the data pass any reading of the template: the sandbox stops
    them when it renders (one line, exit 2), even with --trust-task-code."""
    marker = tmp_path / "marker"
    text = "\"{{ (cycler|attr(question[:8])|attr(question[8:])).os.system('touch " + str(marker) + "') }}\""
    folder = _task_dir(tmp_path, text=text)
    (folder / "items.jsonl").write_text(json.dumps({"question": "__init____globals__", "choices": ["a", "b"],
                                                    "label": 0}) + "\n")
    rc = cli(_commands(model_dir, folder)["zeroshot"] + ["--trust-task-code"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spectrascope")]
    assert not marker.exists(), "the template's payload ran"
    assert rc == 2 and len(err) == 1, err      # (after the weights' loading bars, part 7 of the issue)
    assert "my_arc" in err[0] and "sandbox" in err[0]


# --- the opt-in ------------------------------------------------------------------------------

HONEST = "def doc_to_text(doc):\n    return 'Question: ' + doc['question'] + '\\nAnswer:'\n"


def test_trusted_hook_task_runs_with_the_flag_and_a_plain_folder_without(model_dir, tmp_path, capsys):
    folder = _task_dir(tmp_path / "hook", text="!function utils.doc_to_text", files={"utils.py": HONEST})
    plain = _task_dir(tmp_path / "plain")
    for argv in (_commands(model_dir, folder)["zeroshot"] + ["--trust-task-code", "--json"],
                 _commands(model_dir, plain)["zeroshot"] + ["--json"]):
        rc = cli(argv)
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        out = json.loads(captured.out)
        (task,) = out["tasks"]
        assert task["task"] == "my_arc" and task["n"] == 2 and 0 <= task["acc"] <= 1
        assert Registry().get(out["run_id"])["status"] == "done"


# --- --zeroshot checked before work ----------------------------------------------------------

@pytest.mark.parametrize("command", ["zeroshot", "prune", "sweep"])
def test_unknown_task_is_refused_before_the_model_loads(command, model_dir, tmp_path, capsys):
    folder = _task_dir(tmp_path)
    _refused(capsys, _commands(model_dir, folder, task="no_such_task")[command], "no_such_task", seconds=60)


@pytest.mark.parametrize("command", ["zeroshot", "prune", "sweep"])
def test_missing_harness_is_refused_before_the_model_loads(command, model_dir, tmp_path):
    folder = _task_dir(tmp_path)
    argv = _commands(model_dir, folder)[command]
    code = ("import sys; sys.modules['lm_eval'] = None\n"       # `import lm_eval` fails as if not installed
            "from core.cli import main\nsys.exit(main(sys.argv[1:]))")
    before = _runs()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1, err
    assert "lm-evaluation-harness" in err[0] and "pip install 'spectrascope[zeroshot]'" in err[0]
    assert _runs() == before, "a run was recorded: the refusal came after the work started"
    assert not (tmp_path / "sweep.csv").exists()
