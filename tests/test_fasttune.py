"""Fast tuning: every candidate's masks from one statistics pass, the best and uniform confirmed
with the full protocol, uniform chosen unless an epsilon > 0 beats it."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import tiny_model
from core.fasttune import dense_statistics, fast_tune
from core.models import wrap_model
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.calibration import holdout_split
from core.tuning import TUNE_COLUMNS, tune
from test_bos import make_tokenizer, text_file  # noqa: F401  (text_file: the shared text fixture)


def _tiny(seed: int = 4):
    return wrap_model(tiny_model("llama", seed=seed), make_tokenizer(False))


def _base(text: str, method: str, **kw) -> PruneSpec:
    return PruneSpec(method=method, sparsity=0.6, mapping="matrix", device="cpu",
                     calibration=CalibrationSpec(text, nsamples=2, seqlen=32), **kw)


def test_magnitude_candidates_score_as_the_full_protocol(text_file, tmp_path, monkeypatch):
    """Magnitude needs no data: the fast masks ARE the full protocol's, so each confirmed row's
    fast score equals the perplexity ``tune`` (block by block, a pruned copy) gives it."""
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded = _tiny()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    base = _base(text_file[0], "magnitude")
    result = fast_tune(base, epsilons=[0.0, 0.2, 0.4], xmins=["peak"], metric_columns=["alpha"],
                       holdout_windows=3, confirm_windows=3, loaded=loaded)
    t = result.table
    assert list(t.columns) == [*TUNE_COLUMNS, "confirmed"] and len(t) == 3
    full = tune(base, epsilons=[0.0, 0.2, 0.4], xmins=["peak"], metric_columns=["alpha"], holdout_windows=3,
                loaded=loaded).table
    assert t["perplexity"].tolist() == pytest.approx(full["perplexity"].tolist(), rel=1e-6)
    confirmed = t.dropna(subset=["confirmed"])
    assert 0.0 in set(confirmed["epsilon"]) and len(confirmed) in (1, 2)
    assert confirmed["confirmed"].tolist() == pytest.approx(confirmed["perplexity"].tolist(), rel=1e-6)
    # the model is left exactly as it was
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the choice: the lower confirmed perplexity, uniform when no epsilon > 0 beats it
    uniform = float(confirmed.loc[confirmed.epsilon == 0, "confirmed"].iloc[0])
    if result.best["epsilon"] == 0:
        assert result.reason.startswith("uniform is best on this model at S=0.6: epsilon 0")
        assert result.best["perplexity"] == pytest.approx(uniform)
    else:
        assert result.best["perplexity"] < uniform and "beats uniform" in result.reason
    assert result.spec(base).epsilon == result.best["epsilon"]


def test_only_epsilon_zero_says_uniform_is_best(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    result = fast_tune(_base(text_file[0], "wanda"), epsilons=[0.0], xmins=["peak"], metric_columns=["alpha"],
                       holdout_windows=2, confirm_windows=2, loaded=_tiny())
    assert result.best["epsilon"] == 0.0 and "uniform is best" in result.reason and "\n" not in result.reason
    assert "dense model's statistics" in result.proxy


def test_dense_statistics_are_the_dense_models_inputs(text_file, tmp_path, monkeypatch):
    """Each matrix's sum of squared inputs, against hooks on the dense model's own forward pass."""
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded = _tiny()
    calib, _ = holdout_split(_base(text_file[0], "wanda"), loaded, 0.1)
    stats = dense_statistics(loaded, calib, torch.device("cpu"))
    seen: dict[str, torch.Tensor] = {}
    hooks = [loaded.module(m.name).register_forward_pre_hook(
        lambda mod, args, name=m.name: seen.__setitem__(name, seen.get(name, 0) + (
            args[0].reshape(-1, args[0].shape[-1]).double() ** 2).sum(0))) for m in loaded.matrices]
    with torch.no_grad():
        for row in calib.input_ids:
            loaded.model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    assert set(stats) == {m.name for m in loaded.matrices}
    for name, s in stats.items():
        torch.testing.assert_close(s.sq.double(), seen[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_demo_wanda_70_finds_the_full_grids_winner(demo):
    """On the demo at 70% Wanda, uniform loses clearly (README results): the fast route must not
    fall back to it, and the winner's confirmed score is the full protocol's."""
    base = PruneSpec(method="wanda", sparsity=0.7, device="cpu", calibration=CalibrationSpec(nsamples=4, seqlen=128))
    result = fast_tune(base, epsilons=[0.0, 0.2, 0.3], xmins=["peak"], metric_columns=["alpha"],
                       holdout_windows=4, confirm_windows=4, loaded=demo)
    assert result.best["epsilon"] > 0 and "beats uniform" in result.reason
    assert result.confirmed["perplexity"] < result.confirmed["uniform"]


def test_epsilon_auto_is_alphas_default_where_it_can_tune(tmp_path):
    from core.cli import build_parser

    metrics = tmp_path / "m.csv"
    metrics.write_text("name,alpha\n")
    assert PruneSpec(allocation="alpha").epsilon == "auto"
    assert PruneSpec(allocation="alpha", epsilon=0.2).epsilon == 0.2
    assert PruneSpec(allocation="alpha", metrics_file=metrics).epsilon is None      # a profile keeps the paper's 0.3
    assert PruneSpec(allocation="alpha", streaming=True, save=tmp_path / "out").epsilon is None
    assert PruneSpec(allocation="uniform").epsilon is None
    text = tmp_path / "t.txt"
    text.write_text("some text")
    same = dict(calibration=CalibrationSpec(str(text)), evaluation=EvaluationSpec(dataset=str(text)))
    assert PruneSpec(allocation="alpha", **same).epsilon is None      # tuning would read the evaluation text
    for bad, why in ((dict(allocation="uniform", epsilon="auto"), "use it with allocation alpha"),
                     (dict(allocation="alpha", epsilon="auto", streaming=True, save=tmp_path / "o"), "in memory"),
                     (dict(allocation="alpha", epsilon="auto", **same), "would be evaluation text")):
        with pytest.raises(ValueError, match=f"epsilon='auto'.*{why}"):
            PruneSpec(**bad)
    spec = PruneSpec(allocation="alpha")
    assert "--epsilon" in spec.to_argv() and spec.to_argv()[spec.to_argv().index("--epsilon") + 1] == "auto"
    assert PruneSpec.from_args(build_parser().parse_args(spec.to_argv())) == spec


def test_cli_refuses_an_epsilon_that_is_neither_a_number_nor_auto(capsys):
    from core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--allocation", "alpha", "--epsilon", "banana"])
    assert exit_.value.code == 2 and "neither a number nor auto" in capsys.readouterr().err


def test_a_run_with_epsilon_auto_records_the_tuning_and_reuses_it(text_file, tmp_path, monkeypatch):
    from core.experiments import prune_and_eval
    from core.registry import Registry

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded = _tiny()
    base = _base(text_file[0], "magnitude", allocation="alpha")
    assert base.epsilon == "auto"
    reg = Registry(tmp_path / "runs.sqlite")
    first = prune_and_eval(base, loaded, registry=reg)
    params = reg.get(first.run_id)["allocation_params"]
    params = json.loads(params) if isinstance(params, str) else params
    tuning = params["tuning"]
    assert tuning["epsilon"] == first.epsilon and isinstance(first.epsilon, float)
    assert tuning["reason"].startswith(("uniform is best", f"epsilon {first.epsilon:g}"))
    kept = list((tmp_path / "tunings").glob("*.json"))
    assert len(kept) == 1 and kept[0].name == tuning["cached"]
    # the same model and settings: the kept choice, not a second tuning (the file is not rewritten)
    stamp = kept[0].stat().st_mtime_ns
    second = prune_and_eval(base, loaded, registry=reg)
    assert second.epsilon == first.epsilon and kept[0].stat().st_mtime_ns == stamp
    # another sparsity is tuned on its own
    prune_and_eval(replace(base, sparsity=0.4), loaded, registry=reg)
    assert len(list((tmp_path / "tunings").glob("*.json"))) == 2


def test_tune_fast_command_says_what_it_chose_and_refuses_ray(text_file, tmp_path, monkeypatch, capsys):
    from core.cli import main

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama", seed=4).save_pretrained(src)
    make_tokenizer(False).save_pretrained(src)
    argv = ["tune", "--model", str(src), "--method", "magnitude", "--sparsity", "0.5", "--epsilons", "0,0.3",
            "--xmins", "peak", "--metrics-cols", "alpha", "--calib", text_file[0], "--nsamples", "2", "--seqlen",
            "32", "--holdout-windows", "2", "--device", "cpu", "--fast"]
    assert main([*argv, "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reason"] and out["best"]["epsilon"] in (0.0, 0.3) and len(out["rows"]) == 2
    assert {"perplexity", "uniform"} <= set(out["confirmed"]) and "exact" in out["proxy"]
    rc = main([*argv, "--ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--fast with --ray" in err[0]


def test_epsilon_auto_on_a_model_without_a_tokenizer_is_refused_before_the_run(tmp_path, monkeypatch):
    from core.experiments import prune_and_eval
    from core.registry import Registry

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded = wrap_model(tiny_model("llama", seed=4))                  # no tokenizer
    reg = Registry(tmp_path / "runs.sqlite")
    with pytest.raises(ValueError, match="epsilon='auto'.*no tokenizer.*--epsilon"):
        prune_and_eval(PruneSpec(method="magnitude", allocation="alpha", sparsity=0.5, device="cpu"), loaded,
                       registry=reg)
    assert reg.query().empty                                           # refused before it was recorded
