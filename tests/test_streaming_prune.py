"""Pruning models larger than memory: a model saved as many safetensors shards, pruned block
by block from its shards (``load_skeleton`` + ``prune_to_folder``), gives bit for bit the
checkpoint of pruning the fully loaded model, and the source folder stays untouched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from core.cli import build_parser
from core.experiments import prune_and_eval
from core.spec import PruneSpec
from core.models import REPORT_NAME, is_skeleton, load_model, load_skeleton, save_model
from core.pruning import owl_scores, prune, prune_to_folder
from core.registry import Registry


def _ids(n=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "opt"])
def source(request, tmp_path_factory) -> Path:
    """A tiny model saved as many shards (a few blocks' tensors each)."""
    folder = tmp_path_factory.mktemp(f"src-{request.param}")
    tiny_model(request.param, seed=3).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) >= 4
    return folder


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _ratios(loaded, kind):
    if kind == "uniform":
        return 0.5
    return {m.name: [0.0, 0.3, 0.5, 0.7, 0.9, 0.45, 0.61][i % 7] for i, m in enumerate(loaded.matrices)}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("method,ratios,nm", [("magnitude", "uniform", None), ("magnitude", "mixed", None),
                                              ("wanda", "uniform", None), ("wanda", "mixed", None),
                                              ("sparsegpt", "uniform", None), ("sparsegpt", "mixed", None),
                                              ("wanda", None, "2:4"), ("sparsegpt", None, "2:4")])
def test_streamed_prune_equals_the_fully_loaded_prune(source, tmp_path, method, ratios, nm):
    before = _fingerprint(source)
    loaded = load_model(source, device="cpu")
    r = None if nm else _ratios(loaded, ratios)
    full = prune(loaded, r, method=method, calibration=_ids(), nm=nm, device="cpu")
    save_model(full.model, tmp_path / "full", {})

    skeleton = load_skeleton(source)
    assert is_skeleton(skeleton) and [m.name for m in skeleton.matrices] == [m.name for m in loaded.matrices]
    streamed = prune_to_folder(skeleton, tmp_path / "streamed", r, method=method, calibration=_ids(), nm=nm,
                               device="cpu", report=lambda res, folder: {"sparsity": res.sparsity})

    _assert_same_checkpoint(tmp_path / "full", tmp_path / "streamed")
    assert streamed.matrices.equals(full.matrices)
    assert json.loads((tmp_path / "streamed" / REPORT_NAME).read_text())["sparsity"] == full.sparsity
    assert all(p.is_meta for p in skeleton.model.parameters())   # every tensor was freed again
    assert _fingerprint(source) == before              # the source is never touched
    # the output is an ordinary checkpoint: it loads and computes like the pruned model
    ids = _ids(2, 16, seed=1)
    reloaded = load_model(tmp_path / "streamed", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, full.model.model(ids).logits)


def test_owl_scores_stream_too(source):
    loaded = load_model(source, device="cpu")
    expected = owl_scores(loaded, _ids(), device="cpu")
    skeleton = load_skeleton(source)
    assert owl_scores(skeleton, _ids(), device="cpu") == expected
    assert is_skeleton(skeleton)


@pytest.mark.parametrize("allocation", ["owl", "alpha"])
def test_prune_and_eval_streams_with_the_spec(source, tmp_path, allocation):
    reg = Registry(tmp_path / "runs.sqlite")
    kw = dict(model=str(source), method="wanda", allocation=allocation, sparsity=0.6, device="cpu",
              epsilon=0.3 if allocation == "alpha" else None)     # a streamed run cannot tune epsilon (auto)
    full = prune_and_eval(PruneSpec(**kw, save=tmp_path / "full"), calibration=_ids(), registry=reg)
    run = prune_and_eval(PruneSpec(**kw, save=tmp_path / "streamed", streaming=True), calibration=_ids(),
                         registry=reg)
    _assert_same_checkpoint(tmp_path / "full", tmp_path / "streamed")
    assert run.output_dir == tmp_path / "streamed" and run.achieved == full.achieved
    report = json.loads((tmp_path / "streamed" / REPORT_NAME).read_text())
    assert "--streaming" in report["spec"] and report["achieved_sparsity"] == full.achieved
    assert reg.get(run.run_id)["achieved_sparsity"] == full.achieved


def test_streaming_needs_a_save_folder_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="streaming.*--save"):
        prune_and_eval(PruneSpec(method="magnitude", streaming=True), registry=Registry(tmp_path / "r.sqlite"))
    spec = PruneSpec(method="sparsegpt", save=tmp_path / "out", streaming=True)
    argv = spec.to_argv()
    assert argv[-1] == "--streaming"
    assert PruneSpec.from_args(build_parser().parse_args(argv)) == spec
    assert PruneSpec.from_args(build_parser().parse_args(PruneSpec().to_argv())).streaming is False


def test_a_gguf_source_streams_through_its_converted_folder(demo, tmp_path):
    """The demo (a GGUF file; tied embeddings: the checkpoint has no separate head)."""
    full = prune(demo, 0.5, method="magnitude", device="cpu", copy=True)
    save_model(full.model, tmp_path / "full", {})
    skeleton = load_skeleton("demo")
    assert skeleton.path == demo.path and skeleton.identity == demo.identity
    prune_to_folder(skeleton, tmp_path / "streamed", 0.5, method="magnitude", device="cpu")
    _assert_same_checkpoint(tmp_path / "full", tmp_path / "streamed")


def test_streaming_refuses_what_it_would_not_do(tmp_path):
    """The streamed path evaluates and analyses its output (tests/test_streaming_eval.py) but does
    not score zero-shot tasks: asking for them is one clear error, not silently dropped."""
    from core.spec import EvaluationSpec

    assert PruneSpec(method="wanda", save=tmp_path / "a", streaming=True, analyze_output=True).analyze_output
    with pytest.raises(ValueError, match="--zeroshot needs the whole model.*spectrascope zeroshot"):
        PruneSpec(method="wanda", save=tmp_path / "b", streaming=True,
                  evaluation=EvaluationSpec(evaluate=True, zeroshot=("rte",)))
