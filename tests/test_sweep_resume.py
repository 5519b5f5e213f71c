"""A sweep run again with ``--resume`` reuses its finished runs (same weights, same arguments as
asked, same versions) and runs only the missing ones; anything different runs again."""
from __future__ import annotations

import json

import pandas as pd

from core.cli import main as cli
from core.registry import Registry
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.sweeps import sweep
from test_executor import TIMING, text_file, tiny  # noqa: F401  (fixtures)


def _base(tiny, text_file) -> PruneSpec:
    return PruneSpec(model=str(tiny), device="cpu", calibration=CalibrationSpec(dataset=str(text_file), nsamples=2,
                     seqlen=32), evaluation=EvaluationSpec(dataset="wiki", seqlen=32, max_windows=2))


def _ids(registry: Registry) -> list[int]:
    return [int(i) for i in registry.query()["id"]]


def test_resume_runs_only_what_is_missing(tiny, text_file, tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    base = _base(tiny, text_file)
    grid = dict(methods=["magnitude"], allocations=["uniform", "alpha"], epsilons=[0.2])
    first = sweep(base, sparsities=[0.5], registry=reg, **grid)
    assert len(_ids(reg)) == 3                                         # dense, uniform, alpha
    again = sweep(base, sparsities=[0.5, 0.6], registry=reg, resume=True, **grid)
    assert len(_ids(reg)) == 3 + 2                                     # only the two runs at 0.6
    pd.testing.assert_frame_equal(again.iloc[:2].reset_index(drop=True), first.iloc[:2].reset_index(drop=True))
    alpha = (again["allocation"] == "alpha") & (again["sparsity"] == 0.5)
    assert again.loc[alpha, "run_id"].tolist() == first.loc[first["allocation"] == "alpha", "run_id"].tolist()
    # the whole sweep again: nothing runs, the same table
    same = sweep(base, sparsities=[0.5, 0.6], registry=reg, resume=True, **grid)
    assert len(_ids(reg)) == 5
    pd.testing.assert_frame_equal(same, again)
    # without --resume every run runs again
    sweep(base, sparsities=[0.5], registry=reg, **grid)
    assert len(_ids(reg)) == 8


def test_a_run_of_other_settings_or_versions_is_not_reused(tiny, text_file, tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    base = _base(tiny, text_file)
    grid = dict(methods=["magnitude"], allocations=["uniform"], sparsities=[0.5], dense=False)
    sweep(base, registry=reg, **grid)
    other = PruneSpec(**{**base.__dict__, "calibration": CalibrationSpec(dataset=str(text_file), nsamples=2,
                                                                         seqlen=32, seed=1)})
    sweep(other, registry=reg, resume=True, **grid)                     # another calibration seed: runs
    assert len(_ids(reg)) == 2
    run_id = _ids(reg)[0]
    with reg._connect() as con:                                         # as if made by another version
        con.execute("UPDATE runs SET versions = ? WHERE id = ?", (json.dumps({"spectrascope": "0.0"}), run_id))
    sweep(base, registry=reg, resume=True, **grid)
    assert len(_ids(reg)) == 3


def test_sweep_command_resume(tiny, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    argv = ["sweep", "--model", str(tiny), "--device", "cpu", "--methods", "magnitude", "--allocations", "uniform",
            "--sparsities", "0.5", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32", "--max-windows",
            "2", "--out", str(tmp_path / "s"), "--overwrite", "--json", "--quiet"]
    assert cli(argv) == 0
    first = json.loads(capsys.readouterr().out)["rows"]
    assert cli([*argv, "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)["rows"]
    assert [r["run_id"] for r in again] == [r["run_id"] for r in first]
    assert len(Registry().query()) == 2
