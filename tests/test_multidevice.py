"""Several devices on one machine for pruning and evaluation (issue 19): the blocks are placed
across the devices in contiguous ranges balanced by parameter bytes (``place_blocks``), each
block is pruned on its device and hidden states are handed on at the range boundaries; the
evaluation places the in-memory model's blocks across the devices (a pipeline over the windows)
and a streamed evaluation reads each block onto its device. The numbers are those of one device.
On this CPU-only machine the devices are ``cpu, cpu`` (two positions of one device); the
``cuda`` cases run on the GPU machine (benchmarks/gpu_check.py)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from conftest import refused, tiny_config
from core.cli import main as cli
from core.evaluation import perplexity
from core.models import LoadedModel, load_model, load_skeleton
from core.registry import Registry

TWO = ["cpu", "cpu"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def _deep(family: str = "llama", layers: int = 5, seed: int = 3) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            setattr(cfg, name, layers)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _folder(tmp: Path, family: str = "llama", layers: int = 5) -> Path:
    _deep(family, layers).save_pretrained(tmp, max_shard_size="60KB")
    return tmp


def _calib() -> torch.Tensor:
    return torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(7))


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(1))


# --- placement -----------------------------------------------------------------------------

def _loads(slots: list[int], sizes: list[int], n_dev: int, first: int = 0, last: int = 0) -> list[int]:
    loads = [0] * n_dev
    for s, size in zip(slots, sizes):
        loads[s] += size
    loads[0] += first
    loads[-1] += last
    return loads


def _best(sizes: list[int], n_dev: int, first: int = 0, last: int = 0) -> int:
    """The smallest largest load of any contiguous split (brute force)."""
    n, best = len(sizes), None
    for cuts in itertools.combinations_with_replacement(range(n + 1), n_dev - 1):
        bounds = (0, *cuts, n)
        slots = [d for d in range(n_dev) for _ in range(bounds[d], bounds[d + 1])]
        worst = max(_loads(slots, sizes, n_dev, first, last))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("sizes, n_dev", [([5] * 8, 2), ([1, 9, 2, 2, 7, 3, 3, 1], 3), ([4, 4, 4, 30, 4], 2),
                                          ([3] * 7, 4)])
def test_blocks_are_placed_contiguously_and_balanced(sizes, n_dev):
    from core.pruning.placement import place_blocks

    devices = [f"cuda:{i}" for i in range(n_dev)]
    slots = place_blocks(sizes, devices)
    assert slots == place_blocks(list(sizes), list(devices))                # deterministic
    assert len(slots) == len(sizes)
    assert slots == sorted(slots)                                           # contiguous ranges, in device order
    assert slots[0] == 0 and slots[-1] == n_dev - 1                         # first and last device both used
    assert max(_loads(slots, sizes, n_dev)) == _best(sizes, n_dev)          # the best balance


def test_embeddings_count_on_the_first_device_and_the_head_on_the_last():
    from core.pruning.placement import place_blocks

    sizes = [10] * 6
    slots = place_blocks(sizes, ["a", "b"], first=30, last=0)
    assert max(_loads(slots, sizes, 2, first=30)) == _best(sizes, 2, first=30)
    assert slots.count(0) < slots.count(1)                                  # the embeddings' device gets fewer
    slots = place_blocks(sizes, ["a", "b"], first=0, last=30)
    assert slots.count(0) > slots.count(1)


def test_a_memory_budget_is_kept_or_refused():
    from core.pruning.placement import place_blocks

    sizes = [10] * 6
    slots = place_blocks(sizes, ["a", "b"], budgets=[20, None])
    assert slots.count(0) <= 2 and slots == sorted(slots)
    with pytest.raises(ValueError, match="budget"):
        place_blocks(sizes, ["a", "b"], budgets=[20, 20])


def test_a_loaded_model_is_placed_by_its_parameter_bytes(tmp_path):
    from core.pruning.placement import placement

    _deep(layers=6).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", tokenizer=False)
    place = placement(loaded, TWO)
    assert [str(d) for d in place.devices] == TWO
    assert list(place.slots) == [0, 0, 0, 1, 1, 1]                          # equal blocks: halves
    assert place.describe() == "cpu[blocks 0-2]+cpu[blocks 3-5]"
    assert place.to_dict() == {"devices": ["cpu", "cpu"], "blocks": [[0, 2], [3, 5]]}


# --- pruning: the placement across two devices gives the masks of one --------------------------

@pytest.fixture(scope="module")
def llama5(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("llama5"))


def _weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {m.name: loaded.weight(m.name).detach().clone() for m in loaded.matrices}


@pytest.mark.parametrize("method", METHODS)
def test_in_memory_pruning_across_two_devices_equals_one(llama5, method):
    from core.pruning import prune

    loaded = load_model(llama5, device="cpu", tokenizer=False)
    one = prune(loaded, 0.5, method=method, calibration=_calib(), device="cpu", copy=True)
    two = prune(loaded, 0.5, method=method, calibration=_calib(), devices=TWO, copy=True)
    a, b = _weights(one.model), _weights(two.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name                 # identical masks
        torch.testing.assert_close(a[name], b[name])
    assert two.device == "cpu[blocks 0-2]+cpu[blocks 3-4]"
    assert two.sparsity == pytest.approx(one.sparsity)


@pytest.mark.parametrize("method", METHODS)
def test_streamed_pruning_across_two_devices_equals_one(llama5, tmp_path, method):
    from core.pruning import prune_to_folder
    from safetensors.torch import load_file

    outs = {}
    for label, where in (("one", dict(device="cpu")), ("two", dict(devices=TWO))):
        result = prune_to_folder(load_skeleton(llama5, tokenizer=False), tmp_path / label, 0.5, method=method,
                                 calibration=_calib(), **where)
        outs[label] = {k: v for f in sorted((tmp_path / label).glob("*.safetensors")) for k, v in load_file(f).items()}
        outs[label + "_device"] = result.device
    assert outs["one"].keys() == outs["two"].keys()
    for key, value in outs["one"].items():
        torch.testing.assert_close(outs["two"][key], value, msg=key)
    assert outs["two_device"] == "cpu[blocks 0-2]+cpu[blocks 3-4]"


# --- evaluation ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_in_memory_evaluation_across_two_devices_equals_one(tmp_path, family):
    loaded = load_model(_folder(tmp_path, family, layers=4), device="cpu", tokenizer=False)
    one = perplexity(loaded, ids=_ids(), seqlen=40, device="cpu")
    two = perplexity(loaded, ids=_ids(), seqlen=40, devices=TWO)
    assert two.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert (two.tokens, two.windows) == (one.tokens, one.windows)
    assert two.device == "cpu[blocks 0-1]+cpu[blocks 2-3]"
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())   # back where it was
    assert not any(blk._forward_pre_hooks for blk in loaded.blocks)          # nothing left attached


def test_streamed_evaluation_across_two_devices_equals_one(llama5):
    one = perplexity(load_model(llama5, device="cpu", tokenizer=False), ids=_ids(), seqlen=40, device="cpu")
    skeleton = load_skeleton(llama5, tokenizer=False)
    two = perplexity(skeleton, ids=_ids(), seqlen=40, devices=TWO)
    assert two.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert two.device == "cpu[blocks 0-2]+cpu[blocks 3-4]"
    assert all(p.is_meta for p in skeleton.model.parameters())


# --- the run: spec, record, CLI ---------------------------------------------------------------

def _spec(model: Path, **kw):
    from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec

    return PruneSpec(model=str(model), method="wanda", sparsity=0.5, calibration=CalibrationSpec(nsamples=4, seqlen=32),
                     evaluation=EvaluationSpec(evaluate=True, seqlen=32, max_windows=5), device="cpu", **kw)


@pytest.fixture(scope="module")
def llama5_tok(tmp_path_factory) -> Path:
    from test_streaming_eval import _byte_tokenizer

    folder = _folder(tmp_path_factory.mktemp("llama5tok"))
    _byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("streaming", [False, True])
def test_a_run_across_two_devices_is_recorded_with_its_placement(llama5_tok, tmp_path, streaming):
    from core.experiments import prune_and_eval

    registry = Registry(tmp_path / "runs.db")
    one = prune_and_eval(_spec(llama5_tok, streaming=streaming, save=tmp_path / "one"), registry=registry)
    two = prune_and_eval(_spec(llama5_tok, streaming=streaming, save=tmp_path / "two", devices=("cpu", "cpu")),
                         registry=registry)
    assert two.perplexity.perplexity == pytest.approx(one.perplexity.perplexity, rel=1e-5)
    row = registry.get(two.run_id)
    assert row["device"] == "cpu,cpu"
    assert registry.get(one.run_id)["device"] == "cpu"
    assert two.key == one.key                                                # the same comparison
    report = json.loads((tmp_path / "two" / "spectrascope_report.json").read_text())
    assert report["placement"] == {"devices": ["cpu", "cpu"], "blocks": [[0, 2], [3, 4]]}
    assert "--devices" in report["spec"] and "cpu,cpu" in report["spec"]


def test_an_eval_run_across_two_devices_is_recorded(llama5_tok, tmp_path):
    from core.experiments import eval_run

    registry = Registry(tmp_path / "runs.db")
    _, one = eval_run(_spec(llama5_tok), registry=registry)
    run_id, two = eval_run(_spec(llama5_tok, devices=("cpu", "cpu")), registry=registry)
    assert two.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert registry.get(run_id)["device"] == "cpu,cpu"


@pytest.mark.parametrize("command", ["prune", "eval"])
@pytest.mark.parametrize("devices, named", [("cpu,meta", "meta"), ("cpu,cuda:5", "cuda:5"), ("cpu,cpu", "twice")])
def test_a_device_the_machine_lacks_is_refused_before_the_load(llama5_tok, capsys, command, devices, named):
    if named == "cuda:5" and torch.cuda.device_count() > 5:
        pytest.skip("this machine has a cuda:5")
    extra = ["--method", "wanda", "--eval"] if command == "prune" else []
    before = len(Registry().query())                 # the session's home holds other tests' runs
    refused(capsys, [command, "--model", str(llama5_tok), *extra, "--devices", devices, "--quiet"], named, within=15)
    assert len(Registry().query()) == before                                # nothing recorded


def test_one_device_in_devices_is_device(llama5_tok, capsys):
    argv = ["eval", "--model", str(llama5_tok), "--seqlen", "32", "--max-windows", "4", "--json", "--quiet"]
    assert cli(argv + ["--device", "cpu"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli(argv + ["--devices", "cpu"]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert same["perplexity"] == one["perplexity"] and same["device"] == one["device"] == "cpu"
    assert Registry().get(same["run_id"])["device"] == "cpu"


def test_zeroshot_with_several_devices_is_refused(llama5_tok):
    from core.spec import EvaluationSpec, PruneSpec

    with pytest.raises(ValueError, match="zeroshot"):
        PruneSpec(model=str(llama5_tok), devices=("cpu", "cpu"), evaluation=EvaluationSpec(zeroshot=("arc_easy",)))


# --- on a GPU: cuda:0 + cpu ---------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_pruning_on_cuda_and_cpu_equals_the_cpu(llama5, method):
    from core.pruning import prune

    loaded = load_model(llama5, device="cpu", tokenizer=False)
    one = prune(loaded, 0.5, method=method, calibration=_calib(), device="cpu", copy=True)
    two = prune(loaded, 0.5, method=method, calibration=_calib(), devices=["cuda:0", "cpu"], copy=True)
    a, b = _weights(one.model), _weights(two.model)
    agree = sum(int((a[n] == 0).eq(b[n] == 0).sum()) for n in a) / sum(a[n].numel() for n in a)
    assert agree > 0.999                                                      # float differences may flip ties
    assert abs(two.sparsity - one.sparsity) < 1e-3
    assert two.device.startswith("cuda:0[blocks 0-") and "+cpu[blocks" in two.device


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_cuda_and_cpu_equals_the_cpu(llama5):
    loaded = load_model(llama5, device="cpu", tokenizer=False)
    one = perplexity(loaded, ids=_ids(), seqlen=40, device="cpu")
    two = perplexity(loaded, ids=_ids(), seqlen=40, devices=["cuda:0", "cpu"])
    three = perplexity(load_skeleton(llama5, tokenizer=False), ids=_ids(), seqlen=40, devices=["cuda:0", "cpu"])
    assert two.perplexity == pytest.approx(one.perplexity, rel=1e-4)
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-4)
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())


def test_the_devices_round_trip_through_the_cli_arguments(llama5_tok):
    from core.cli import build_parser
    from core.spec import PruneSpec

    spec = PruneSpec(model=str(llama5_tok), devices="cuda:0,cuda:1")
    assert spec.devices == ("cuda:0", "cuda:1") and spec.device == "cuda:0" and spec.recorded_device == "cuda:0,cuda:1"
    assert PruneSpec.from_args(build_parser().parse_args(spec.to_argv())) == spec
    assert PruneSpec(model=str(llama5_tok), devices="1").device == "cuda:1"                 # one device is --device
    assert PruneSpec(model=str(llama5_tok), devices="1").devices == ()
    with pytest.raises(ValueError, match="--device cpu and --devices"):
        PruneSpec(model=str(llama5_tok), device="cpu", devices="cuda:0,cuda:1")
