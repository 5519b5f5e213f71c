"""PruneSpec (validation, argv round trip), the recorded prune / eval pipelines, saving, the
prune CLI with its JSON progress channel, and sweeps."""
from __future__ import annotations

import hashlib
import json
import threading

import pandas as pd
import pytest
import torch

from conftest import tiny_config, tiny_model
from core.cli import build_parser, main
from core.cli.prune import parse_epsilons
from core.evaluation import perplexity
from core.experiments import prune_and_eval
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.models import REPORT_NAME, load_model, save_model, wrap_model
from core.progress import Cancelled
from core.pruning import prune
from core.registry import Registry
from core.sweeps import pivot, sweep, sweep_report


def _ids(n=3, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# --- the spec ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"method": "prune-all"}, r"^method='prune-all': unknown; use one of magnitude, wanda, sparsegpt$"),
    ({"allocation": "random"}, r"^allocation='random': unknown"),
    ({"allocation": "file"}, r"^allocation='file': a ratios file and allocation 'file' go together"),
    ({"sparsity": 1.0}, r"^sparsity=1.0: give a fraction in \[0, 1\)$"),
    ({"sparsity": -0.1}, r"^sparsity=-0.1: "),
    ({"sparsity": "0.5"}, r"^sparsity='0.5': give a number"),
    ({"epsilon": 1.2}, r"^epsilon=1.2: "),
    ({"r_max": 0.0}, r"^r_max=0.0: give a fraction in \(0, 1\)$"),
    ({"sparsity": 0.8, "r_max": 0.7}, r"^sparsity=0.8 is above r_max=0.7"),
    ({"mapping": "layer"}, r"^mapping='layer': unknown; use one of block, matrix$"),
    ({"nm": "2-4"}, r"^nm='2-4': write N:M"),
    ({"nm": "4:2"}, r"^nm='4:2': "),
    ({"dtype": "int8"}, r"^dtype='int8': unknown; use one of float32, float16, bfloat16$"),
    ({"device": "gpu"}, r"^device='gpu': use auto, cpu, cuda, cuda:N or mps$"),
    ({"reverse": "yes"}, r"^reverse='yes': give True or False$"),
    ({"model": ""}, r"^model='': give a non-empty name$"),
    ({"xmin": "max"}, r"^xmin='max': unknown; use one of full, peak, peak-compat, mid$"),
])
def test_spec_refuses_bad_fields_in_one_line_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PruneSpec(**fields)


def test_nested_specs_and_paths_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"^calibration.nsamples=0: give a whole number >= 1$"):
        CalibrationSpec(nsamples=0)
    with pytest.raises(ValueError, match=r"^evaluation.max_windows=0: "):
        EvaluationSpec(max_windows=0)
    with pytest.raises(ValueError, match=r"^evaluation.evaluate=1: give True or False$"):
        EvaluationSpec(evaluate=1)
    with pytest.raises(ValueError, match=r"^calibration.bos='always': unknown; use one of auto, paper, none$"):
        CalibrationSpec(bos="always")
    with pytest.raises(ValueError, match=r"^evaluation.bos='first': unknown; use one of auto, paper, none$"):
        EvaluationSpec(bos="first")
    with pytest.raises(FileNotFoundError, match="ratios_file='.*missing.csv': no such file"):
        PruneSpec(allocation="file", ratios_file=tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="metrics_file="):
        PruneSpec(metrics_file=tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"^save='.*': already exists"):
        PruneSpec(save=tmp_path)
    (tmp_path / "r.csv").write_text("name,ratio\n")
    with pytest.raises(ValueError, match=r"^nm='2:4': N:M sparsity does not use a ratios file"):
        PruneSpec(allocation="file", ratios_file=tmp_path / "r.csv", nm="2:4")
    spec = PruneSpec(allocation="file", ratios_file=str(tmp_path / "r.csv"), dense_kinds="k, v",
                     save=tmp_path / "new" / "deeper" / "out")
    assert spec.ratios_file == (tmp_path / "r.csv").resolve() and spec.dense_kinds == ("k", "v")
    assert spec.save.is_absolute() and not spec.save.parent.exists()       # checked, nothing created


def _specs(tmp_path):
    (tmp_path / "r.csv").write_text("name,ratio\n")
    (tmp_path / "m.csv").write_text("name,alpha\n")
    return [
        PruneSpec(),
        PruneSpec(model=str(tmp_path / "model"), method="sparsegpt", allocation="alpha", sparsity=0.7, epsilon=0.25,
                  metric="alpha_hat", xmin="mid", mapping="matrix", r_max=0.95, dense_kinds=("k", "v"), reverse=True,
                  metrics_file=tmp_path / "m.csv",
                  calibration=CalibrationSpec("c4", 16, 512, 7, "paper"),
                  evaluation=EvaluationSpec(True, "wikitext2", 1024, 8, "none"),
                  device="cuda:1", dtype="bfloat16", save=tmp_path / "out" / "pruned", trust_remote_code=True),
        PruneSpec(method="magnitude", allocation="file", ratios_file=tmp_path / "r.csv", device="cpu",
                  calibration=CalibrationSpec(bos="none"), evaluation=EvaluationSpec(bos="none")),
        PruneSpec(method="wanda", allocation="alpha", nm="2:4", sparsity=0.0, dtype="float16"),
        PruneSpec(method="wanda", sparsity=0.1 + 0.2, epsilon=0.0,     # floats that print long
                  evaluation=EvaluationSpec(True, str(tmp_path / "text.txt"), 64)),
    ]


def test_spec_round_trips_through_the_cli_arguments(tmp_path):
    parser = build_parser()
    for spec in _specs(tmp_path):
        argv = spec.to_argv()
        assert argv[0] == "prune" and all(isinstance(a, str) for a in argv)
        assert PruneSpec.from_args(parser.parse_args(argv)) == spec


def test_spec_from_hand_written_arguments(tmp_path):
    (tmp_path / "r.csv").write_text("name,ratio\n")
    parse = build_parser().parse_args
    spec = PruneSpec.from_args(parse(["prune", "--method", "wanda", "--seqlen", "256", "--ratios",
                                      str(tmp_path / "r.csv"), "--dense-kinds", "k,v", "--eval"]))
    assert spec.allocation == "file" and spec.ratios_file == (tmp_path / "r.csv").resolve()
    assert spec.calibration == CalibrationSpec("wiki", 128, 256, 0)
    assert spec.evaluation == EvaluationSpec(True, "wiki", 256, None)      # the window follows --seqlen
    assert spec.calibration.bos == spec.evaluation.bos == "auto" and spec.xmin == "peak"
    paper = PruneSpec.from_args(parse(["prune", "--method", "wanda", "--bos", "paper"]))
    assert paper.calibration.bos == paper.evaluation.bos == "paper"           # --bos sets both
    assert parse(["prune", "--method", "wanda", "--bos", "none"]).bos == "none"
    with pytest.raises(SystemExit):
        parse(["eval", "--bos", "first"])
    assert spec.dense_kinds == ("k", "v") and spec.epsilon is None and spec.model == "demo"
    with pytest.raises(ValueError, match="allocation='alpha': a ratios file and allocation 'file' go together"):
        PruneSpec.from_args(parse(["prune", "--method", "wanda", "--allocation", "alpha", "--ratios",
                                   str(tmp_path / "r.csv")]))


# --- pipelines -----------------------------------------------------------------------------

def test_pruned_model_saves_reloads_with_same_perplexity(tmp_path):
    loaded = wrap_model(tiny_model("llama"))
    reg = Registry(tmp_path / "runs.sqlite")
    dest = tmp_path / "new" / "pruned"                       # a missing parent folder is created
    spec = PruneSpec(method="sparsegpt", sparsity=0.6, device="cpu", save=dest)
    run = prune_and_eval(spec, loaded, calibration=_ids(), registry=reg)
    assert run.output_dir == dest.resolve()
    report = json.loads((dest / REPORT_NAME).read_text())
    assert {"name", "ratio", "achieved"} <= set(report["matrices"][0])
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert report["spec"][:5] == ["prune", "--model", "demo", "--method", "sparsegpt"]
    again = load_model(dest, device="cpu", tokenizer=False)
    ids = torch.randint(0, 256, (640,), generator=torch.Generator().manual_seed(3))
    # the original is still dense; the reloaded copy has the recorded sparsity
    assert all((loaded.weight(m.name) != 0).all() for m in loaded.matrices)
    reloaded_sparsity = sum(float((again.weight(m.name) == 0).sum()) for m in again.matrices) / sum(
        m.params for m in again.matrices)
    assert reloaded_sparsity == pytest.approx(run.achieved)
    row = reg.get(run.run_id)
    assert row["status"] == "done" and row["output_dir"] == str(dest.resolve())
    assert row["calibration"] == {"nsamples": 3, "seqlen": 32}
    assert reg.matrices(run.run_id)["achieved"].tolist() == pytest.approx(run.matrices["achieved"].tolist())
    # same perplexity as the pruned model in memory: prune again (deterministic) and compare
    mem = prune(loaded, 0.6, method="sparsegpt", calibration=_ids(), device="cpu", copy=True).model
    p_mem = perplexity(mem, ids=ids, seqlen=64, device="cpu").perplexity
    p_disk = perplexity(again, ids=ids, seqlen=64, device="cpu").perplexity
    assert p_disk == pytest.approx(p_mem, rel=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        save_model(again, dest, {})


def test_failed_and_cancelled_runs_are_recorded_and_leave_no_folder(tmp_path, monkeypatch):
    loaded = wrap_model(tiny_model("llama"))
    reg = Registry(tmp_path / "runs.sqlite")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        prune_and_eval(PruneSpec(method="wanda", device="cpu", save=tmp_path / "a"), loaded, calibration=_ids(),
                       registry=reg, cancel=stop)
    model_cls = type(loaded.model)

    def broken_save(self, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"half")   # a half-written file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(model_cls, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prune_and_eval(PruneSpec(method="magnitude", nm="2:4", device="cpu", save=tmp_path / "b"), loaded,
                       registry=reg)
    runs = reg.query()
    assert runs["status"].tolist() == ["cancelled", "failed"]
    assert "disk full" in runs["error"].iloc[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite", "runs.sqlite-shm", "runs.sqlite-wal"] \
        or sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]


def test_alpha_allocation_prunes_to_the_target_mean(tmp_path):
    loaded = wrap_model(tiny_model("llama"))
    reg = Registry(tmp_path / "runs.sqlite")
    run = prune_and_eval(PruneSpec(method="wanda", allocation="alpha", sparsity=0.6, epsilon=0.3, device="cpu"),
                         loaded, calibration=_ids(), registry=reg)
    m = run.matrices
    assert m["ratio"].max() - m["ratio"].min() > 0.1                      # not uniform
    assert (m["ratio"] * m["params"]).sum() / m["params"].sum() == pytest.approx(0.6)
    assert run.achieved == pytest.approx(0.6, abs=0.01)
    row = reg.get(run.run_id)
    assert row["allocation"] == "alpha" and row["epsilon"] == 0.3
    assert row["allocation_params"]["mapping"] == "block"


# --- the CLI -------------------------------------------------------------------------------

@pytest.fixture
def saved_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    return src


def test_cli_prune_and_eval_on_a_saved_folder(tmp_path, saved_tiny, capsys):
    """The prune and eval sub-commands end to end (magnitude needs no tokenizer or text)."""
    src = saved_tiny
    before = sorted(p.name for p in src.iterdir())
    rc = main(["prune", "--model", str(src), "--method", "magnitude", "--sparsity", "0.6", "--device", "cpu",
               "--save", str(tmp_path / "out"), "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert {"ratio", "achieved"} <= set(out["matrices"][0])
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["matrices"][0]["ratio"] == 0.6
    assert sorted(p.name for p in src.iterdir()) == before            # the source is never touched
    assert main(["prune", "--model", str(src), "--method", "magnitude", "--save", str(tmp_path / "out"),
                 "--quiet"]) == 2                                        # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    runs = Registry(tmp_path / "home" / "runs.sqlite").query()
    assert runs["status"].tolist() == ["done"]                         # refused before any work


def test_cli_prune_takes_the_ratios_of_an_allocation_file(tmp_path, saved_tiny, capsys):
    """`analyze --out` -> `allocate --out` -> `prune --ratios`: the pruned model follows the file
    exactly, and the run is recorded as allocation file with the file's path, hash and mean."""
    src = saved_tiny
    assert main(["analyze", "--model", str(src), "--device", "cpu", "--out", str(tmp_path / "m.csv"), "--quiet"]) == 0
    assert main(["allocate", "--metrics", str(tmp_path / "m.csv"), "--sparsity", "0.5", "--epsilon", "0.4",
                 "--dense-kinds", "k,v", "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0
    wanted = pd.read_csv(tmp_path / "r.csv").set_index("name")
    assert (wanted.loc[wanted.index.str.contains("k_proj|v_proj"), "ratio"] == 0).all()
    rc = main(["prune", "--model", str(src), "--method", "magnitude", "--ratios", str(tmp_path / "r.csv"),
               "--device", "cpu", "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    got = pd.DataFrame(out["matrices"]).set_index("name")
    pd.testing.assert_series_equal(got["ratio"], wanted.loc[got.index, "ratio"], check_names=False)
    assert (got["achieved"] - got["ratio"]).abs().max() < 1 / 64          # one weight per row of 64 inputs
    row = Registry(tmp_path / "home" / "runs.sqlite").get(out["run_id"])
    mean = float((wanted["ratio"] * wanted["params"]).sum() / wanted["params"].sum())
    assert row["allocation"] == "file" and row["sparsity"] == pytest.approx(mean, abs=1e-9)
    assert row["allocation_params"]["path"] == str((tmp_path / "r.csv").resolve())
    assert row["allocation_params"]["sha256"] == hashlib.sha256((tmp_path / "r.csv").read_bytes()).hexdigest()
    # a file for another model is refused with the reason
    pd.DataFrame({"name": ["x"], "ratio": [0.5]}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["prune", "--model", str(src), "--method", "magnitude", "--ratios", str(tmp_path / "bad.csv"),
                 "--quiet"]) == 2
    assert "has no ratio for the model's matrices model.layers.0.self_attn.q_proj" in capsys.readouterr().err


def test_progress_json_lines_and_one_error_line(tmp_path, saved_tiny, capsys):
    rc = main(["--progress-json", "prune", "--model", str(saved_tiny), "--method", "magnitude", "--nm", "2:4",
               "--device", "cpu", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["achieved_sparsity"] == pytest.approx(0.5)   # the result is on stdout
    events = [json.loads(line) for line in captured.err.splitlines()]          # every line is JSON
    assert {e["event"] for e in events} <= {"progress", "log"}
    events = [e for e in events if e["event"] == "progress"]
    assert events and all(set(e) == {"event", "done", "total", "message"} and 0 <= e["done"] <= e["total"]
                          for e in events)
    assert any(e["done"] == e["total"] for e in events)
    # a refused input: exactly one JSON line, exit 2 in the event and as the return code
    rc = main(["--progress-json", "prune", "--model", str(saved_tiny), "--method", "magnitude",
               "--sparsity", "1.5"])
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert json.loads(line) == {"event": "error", "message": "sparsity=1.5: give a fraction in [0, 1)", "exit": 2}


# --- sweep ---------------------------------------------------------------------------------

def test_sweep_gives_each_method_its_own_epsilon(demo, tmp_path):
    """`sweep` on the embedded text (a tiny random llama with the demo tokenizer, so it is
    quick): dense first, one alpha row per (method, epsilon) with each method's own
    epsilons, every run recorded with the perplexity the table shows."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = len(demo.tokenizer)
    torch.manual_seed(0)
    loaded = wrap_model(AutoModelForCausalLM.from_config(cfg).eval(), demo.tokenizer)
    reg = Registry(tmp_path / "runs.sqlite")
    methods = ["magnitude", "wanda"]
    eps = parse_epsilons("magnitude=0.1,magnitude=0.2,wanda=0.3", methods)
    assert eps == {"magnitude": [0.1, 0.2], "wanda": [0.3]}
    calib = demo.tokenizer("The river flows north through the valley. " * 40, return_tensors="pt").input_ids
    base = PruneSpec(device="cpu", evaluation=EvaluationSpec(dataset="wiki", seqlen=64, max_windows=3))
    table = sweep(base, methods=methods, allocations=["uniform", "alpha"], sparsities=[0.5], epsilons=eps,
                  loaded=loaded, calibration=calib[:, :64], registry=reg)
    assert table.iloc[0]["method"] == "dense" and len(table) == 1 + 2 + 3
    alpha = table[table.allocation == "alpha"]
    assert sorted(alpha[alpha.method == "magnitude"]["epsilon"]) == [0.1, 0.2]
    assert alpha[alpha.method == "wanda"]["epsilon"].tolist() == [0.3]
    assert (table["achieved"].iloc[1:] - 0.5).abs().max() < 0.01
    for row in table.itertuples():
        run = reg.get(int(row.run_id))
        assert run["status"] == "done" and run["perplexity"] == pytest.approx(row.perplexity)
    assert "magnitude alpha (eps 0.2)" in pivot(table)["setting"].tolist()
    # the comparison keys: dense = its evaluation key; magnitude runs use no calibration, wanda the given ids
    dense_key = table["key"].iloc[0]
    assert all(k.startswith(dense_key + "|calib=") for k in table["key"].iloc[1:])
    assert set(table.loc[table.method == "magnitude", "key"]) == {dense_key + "|calib=none"}
    wanda = set(table.loc[table.method == "wanda", "settings"])
    assert wanda == {"wiki · 3×64 · BOS none · calib given 1×64 seed ?"}
    report = sweep_report(table, base, model="tiny", calibration=None, seconds=6.0)
    assert "Comparison keys" in report and "BOS auto" in report
    assert all(f"- {s} (key `{k}`)" in report for s, k in zip(table["settings"], table["key"]))


def test_owl_allocation_reads_and_fills_the_disk_cache(tmp_path, monkeypatch):
    """A prune with OWL ratios reuses the statistics cached for the same weights and calibration
    settings (the Allocation page's background job writes them), and caches what it computes."""
    from core.allocation import allocate, matrix_table
    from core.calibration import Calibration
    from core.prepare import choose_allocation
    from core.owlcache import cache_path, read_owl_scores, settings_of
    from core.pruning import owl_scores

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    loaded = wrap_model(tiny_model("llama"), label="tiny owl")
    calib = Calibration(_ids(4, 32), "wiki", 0, 10_000, "none", False)
    spec = PruneSpec(model="demo", method="wanda", allocation="owl", sparsity=0.5, device="cpu")
    first = choose_allocation(spec, loaded, calibration=calib).ratio_by_name()
    path = cache_path(loaded.identity, settings_of(calib))
    computed = owl_scores(loaded, calib, device="cpu")
    assert read_owl_scores(loaded.identity, settings_of(calib)) == pytest.approx(computed)
    # other scores in the cache: the allocation follows the cache, not a recomputation
    planted = {block: (0.5 if block == 0 else 0.0) for block in computed}
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "scores": planted}))
    second = choose_allocation(spec, loaded, calibration=calib).ratio_by_name()
    expected = allocate(matrix_table(loaded.matrices), sparsity=0.5, method="owl", owl_scores=planted).ratio_by_name()
    assert second == pytest.approx(expected) and second != pytest.approx(first)
    # bare token ids carry no settings: computed, never read from a cache
    assert choose_allocation(spec, loaded, calibration=calib.input_ids).ratio_by_name() == pytest.approx(first)
