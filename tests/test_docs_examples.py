"""Every example in README.md and docs/*.md runs, so none can go stale.

The rule (docs/index.md, "Examples that run"): a fenced block marked ```bash or ```python is an
example and runs here; every other fence (```text, ```yaml, a bare fence) is text. Comments
directly above a block steer it:

    <!-- test: skip REASON -->         not run; listed with its reason in the summary
    <!-- test: args --nsamples 2 -->   appended to every ``spectrascope`` command of the block
    <!-- test: sub OLD => NEW -->      a text substitution (small settings in a Python example)

A bash block whose lines start with ``$ `` runs those lines only (the others are their output).
Each block runs in its own subprocess, in a fresh folder holding the example paths the docs use
(``./my-llama`` and its siblings: tiny random models), with a home of its own (its own runs
registry, so ``run:1`` is the block's first run) that shares the converted demo model and the
caches. ``spectrascope`` and ``python`` are this interpreter (``.venv/bin/`` prefixes mapped),
running this checkout's ``core``.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import _HOME, byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNS = {"bash", "python"}
TEXT = {"", "text", "yaml", "json", "csv", "toml", "markdown"}
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*test:\s*(\w+)\s*(.*?)\s*-->\s*$")
OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>", "2>&1"}
TIMEOUT = 900


@dataclass
class Example:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None
    args: list[str] = field(default_factory=list)
    subs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[tuple[int, str, str, list[tuple[str, str]]]]:
    """(line of the opening fence, language, code, directives just above it) of every fence."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        directives, j = [], i - 1
        while j >= 0 and DIRECTIVE.match(lines[j]):
            d = DIRECTIVE.match(lines[j])
            directives.insert(0, (d.group(1), d.group(2)))
            j -= 1
        end = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == m.group(1)), None)
        assert end is not None, f"{path.name}:{i + 1}: a fence that is never closed"
        out.append((i + 1, m.group(2), "\n".join(lines[i + 1:end]) + "\n", directives))
        i = end + 1
    return out


def examples() -> list[Example]:
    found = []
    for path in PAGES:
        page = str(path.relative_to(ROOT))
        for line, lang, code, directives in blocks(path):
            if lang not in RUNS:
                continue
            ex = Example(page, line, lang, code)
            for kind, value in directives:
                if kind == "skip":
                    ex.skip = value
                elif kind == "args":
                    ex.args += shlex.split(value)
                elif kind == "sub":
                    ex.subs += [tuple(s.strip() for s in part.split("=>", 1)) for part in value.split("|")]
            found.append(ex)
    return found


ALL = examples()
RUN = [e for e in ALL if not e.skip]
SKIPPED = [e for e in ALL if e.skip]


def test_fences_follow_the_rule():
    """Only ```bash and ```python run; others are named text fences (or bare); no shell aliases
    that would silently not run; every directive sits on a block that runs; every skip has a reason."""
    problems = []
    for path in PAGES:
        text = path.read_text().splitlines()
        for line, lang, code, directives in blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if lang not in RUNS | TEXT:
                problems.append(f"{where}: fence ```{lang} (use bash, python or text)")
            if directives and lang not in RUNS:
                problems.append(f"{where}: a test directive above a block that does not run")
            for kind, value in directives:
                if kind not in ("skip", "args", "sub"):
                    problems.append(f"{where}: unknown directive {kind!r}")
                if kind == "skip" and not value:
                    problems.append(f"{where}: a skip without a reason")
        for n, line in enumerate(text, 1):
            if line.startswith("<!--") and "test:" in line and not DIRECTIVE.match(line):
                problems.append(f"{path.relative_to(ROOT)}:{n}: malformed directive {line!r}")
    assert not problems, "\n".join(problems)


def test_examples_are_found_and_skips_are_listed():
    assert len(RUN) >= 15, [e.id for e in RUN]
    print(f"\n{len(RUN)} examples run, {len(SKIPPED)} skipped:")
    for e in SKIPPED:
        print(f"  {e.id}: {e.skip}")


# --- the example folder and home -----------------------------------------------------------------

def _tiny_folder(dest: Path, seed: int = 0) -> Path:
    model = tiny_model("llama", seed=seed)
    model.save_pretrained(dest, safe_serialization=True)
    byte_tokenizer().save_pretrained(dest)
    return dest


def _lora(dest: Path, base: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    tensors = {}
    for b in (0, 1):
        for proj, out in (("q", 64), ("v", 32)):
            name = f"base_model.model.model.layers.{b}.self_attn.{proj}_proj"
            tensors[f"{name}.lora_A.weight"] = torch.randn(4, 64, generator=g) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    dest.mkdir()
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(base),
        "target_modules": ["q_proj", "v_proj"]}))
    return dest


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """Models named by the examples, the shared caches, and a bin folder mapping the commands."""
    from core.analysis import analyze
    from core.models import demo_gguf, gguf_to_folder

    gguf_to_folder(demo_gguf())                 # the session home's demo conversion, shared below
    root = tmp_path_factory.mktemp("docs-examples")
    models = root / "models"
    models.mkdir()
    for name, seed in (("my-llama", 0), ("big-model", 1), ("base-model", 2), ("ckpt-a", 3), ("ckpt-b", 4)):
        _tiny_folder(models / name, seed)
    for step, seed in ((100, 5), (200, 6)):
        _tiny_folder(models / "run" / f"checkpoint-{step}", seed)
    _lora(models / "my-lora", models / "base-model")
    for name, suffix in (("ckpt-a", "csv"), ("ckpt-b", "parquet")):
        analyze(str(models / name), device="cpu", use_cache=False).save_table(models / f"metrics-{name[-1]}.{suffix}")
    caches = root / "caches"
    for sub in ("analyses", "tunings", "owl", "sensitivity"):
        (caches / sub).mkdir(parents=True)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, body in (("spectrascope", f'exec "{sys.executable}" -m core.cli "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"root": root, "models": models, "caches": caches, "bin": bin_dir}


def _workspace(stage: dict, name: str) -> tuple[Path, dict]:
    """A fresh folder with the example models linked in, and the environment of a fresh home."""
    work = stage["root"] / "work" / name
    home = stage["root"] / "homes" / name
    work.mkdir(parents=True)
    home.mkdir(parents=True)
    for entry in stage["models"].iterdir():
        (work / entry.name).symlink_to(entry)
    (work / "benchmarks").symlink_to(ROOT / "benchmarks")      # examples run from the repository's root
    (home / "models").symlink_to(Path(_HOME) / "models")
    for entry in stage["caches"].iterdir():
        (home / entry.name).symlink_to(entry)
    env = dict(os.environ, SPECTRASCOPE_HOME=str(home), PYTHONPATH=str(ROOT),
               PATH=f"{stage['bin']}{os.pathsep}{os.environ.get('PATH', '')}")
    return work, env


# --- turning an example into what runs -------------------------------------------------------------

def _logical_lines(code: str) -> list[str]:
    out, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def _options_of(command: str) -> set[str]:
    from core.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and command in a.choices).choices[command]
    return {s for action in sub._actions for s in action.option_strings}


def _groups(args: list[str]) -> list[list[str]]:
    """``--a 1 --b --c x`` -> [[--a, 1], [--b], [--c, x]]."""
    groups: list[list[str]] = []
    for token in args:
        if token.startswith("-") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def _with_args(line: str, args: list[str], used: set[str]) -> str:
    """``line`` with those of ``args`` that its ``spectrascope`` command takes appended (before any
    operator or comment); the options appended are added to ``used``."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = list(lex)
    if "spectrascope" not in tokens:
        return line
    start = tokens.index("spectrascope")
    end = next((k for k in range(start, len(tokens)) if tokens[k] in OPERATORS), len(tokens))
    command = next(t for t in tokens[start + 1:end] if not t.startswith("-"))
    takes = _options_of(command)
    extra = [t for g in _groups(args) if g[0] in takes for t in g]
    used.update(g[0] for g in _groups(args) if g[0] in takes)
    tokens[end:end] = extra
    return " ".join(t if t in OPERATORS else shlex.quote(t) for t in tokens)


def script(ex: Example) -> str:
    code = ex.code
    for old, new in ex.subs:
        assert old in code, f"{ex.id}: the substitution's text {old!r} is not in the example"
        code = code.replace(old, new)
    if ex.lang == "python":
        return code
    code = code.replace(".venv/bin/spectrascope", "spectrascope").replace(".venv/bin/python", "python")
    lines = _logical_lines(code)
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    if ex.args:
        used: set[str] = set()
        lines = [_with_args(line, ex.args, used) for line in lines]
        unused = [g[0] for g in _groups(ex.args) if g[0] not in used]
        assert not unused, f"{ex.id}: no command of the example takes {unused} (a typo in its test: args?)"
    return "\n".join(lines) + "\n"


DRIVER = """\
import json, shlex, subprocess, sys
from core.cli import main

for line in json.load(open(sys.argv[1])):
    argv = shlex.split(line, comments=True)
    if not argv:
        continue
    if argv[0] == "spectrascope":          # the console script's entry point, in this process
        print("$", line, flush=True)
        rc = main(argv[1:])
    else:
        rc = subprocess.run(["bash", "-euo", "pipefail", "-c", line]).returncode
    if rc:
        print(f"exit {rc}: {line}", file=sys.stderr)
        sys.exit(rc)
"""


def _plain(line: str) -> bool:
    """A line the driver can run alone: a ``spectrascope`` command without shell operators, or a
    command that leaves no state behind for the next line (no cd, export, assignment)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = list(lex)
    if not tokens:
        return True
    if tokens[0] == "spectrascope":
        return not any(t in OPERATORS for t in tokens)
    return tokens[0] not in ("cd", "export", "source", ".", "set") and "=" not in tokens[0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
@pytest.mark.parametrize("ex", RUN, ids=[e.id for e in RUN])
def test_example_runs(ex: Example, stage):
    name = re.sub(r"\W", "_", ex.id)
    work, env = _workspace(stage, name)
    text = script(ex)
    if ex.lang == "python":
        (work / "example.py").write_text(text)
        argv = [sys.executable, "example.py"]
    elif all(_plain(line) for line in text.splitlines()):
        # one process per block: `spectrascope` lines run through core.cli.main (what the console
        # script calls) without paying Python's and torch's start-up for each line
        (work / "example.json").write_text(json.dumps(text.splitlines()))
        (work / "driver.py").write_text(DRIVER)
        argv = [sys.executable, "driver.py", "example.json"]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", text]
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    print(f"{ex.id}: {time.perf_counter() - start:.1f} s, {_children_cpu() - cpu:.1f} s of CPU")
    assert proc.returncode == 0, (f"{ex.id} failed (exit {proc.returncode}) running:\n{text}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")


def test_the_cli_reference_is_the_cli_s_own_help():
    """docs/cli.md is rendered from core.cli.COMMANDS (docs/gen_cli.py): a new option, command or
    help text must reach the reference, or this fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rendered = gen.render()
    from core.cli import COMMANDS

    for name in COMMANDS:
        assert f"\n## {name}\n" in rendered
    assert (ROOT / "docs" / "cli.md").read_text() == rendered, "docs/cli.md is stale: run python docs/gen_cli.py"
