"""The scale benchmarks' arithmetic and housekeeping: the larger-than-memory checkpoint's size
(benchmarks/bench_prune_memory.py --size-gb), written tensor by tensor and removed also on
failure, and the 70B/405B projection (benchmarks/projection.py) against hand-computed cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_prune_memory as bpm  # noqa: E402
import projection  # noqa: E402



@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    """A 256-token byte-level tokenizer (no merges): the tiny runs need no demo model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return folder


def tiny(tokenizer: Path) -> list[str]:
    return ["--hidden", "64", "--inter", "176", "--heads", "4", "--vocab", "256", "--tokenizer", str(tokenizer)]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prune_memory.py"), *args],
                          capture_output=True, text=True, timeout=170, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_layers_for_a_27_gb_llama_7b_shaped_bf16_checkpoint():
    # by hand: outside the blocks 2 x (2 x 49152 x 4096 + 4096) = 805,314,560 bytes; one block
    # 2 x (4 x 4096^2 + 3 x 11008 x 4096 + 2 x 4096) = 404,766,720 bytes;
    # (27e9 - 805,314,560) / 404,766,720 = 64.7 -> 65 blocks = 27,115,151,360 bytes
    assert bpm.layers_for(27 * 10**9, 4096, 11008, 49152) == 65
    assert bpm.checkpoint_bytes(65, 4096, 11008, 49152) == 27_115_151_360
    assert bpm.checkpoint_bytes(64, 4096, 11008, 49152) < 27 * 10**9


def test_written_tensor_by_tensor_into_shards_that_load(tmp_path):
    folder = tmp_path / "ckpt"
    size = bpm.write_large_checkpoint(folder, 3, 64, 176, 4, 1000, shard_bytes=250_000, tokenizer=None)
    shards = sorted(folder.glob("*.safetensors"))
    # by hand: embed + head 2 x 1000 x 64 x 2 = 256,000 bytes; a block 2 x (4 x 64^2 + 3 x 176 x 64 + 2 x 64)
    # = 100,608 bytes; at most 250,000 a shard: [embed, block 0], [block 1, block 2], [norm, head]
    assert len(shards) == 3
    with safe_open(shards[1], "pt") as f:
        assert sorted(f.keys())[0] == "model.layers.1.input_layernorm.weight" and len(list(f.keys())) == 18
    names = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                names[k] = f.get_tensor(k)
    assert len(names) == 3 * 9 + 3 and all(t.dtype == torch.bfloat16 for t in names.values())
    assert names["model.layers.2.mlp.down_proj.weight"].shape == (64, 176)
    assert sum(t.numel() * 2 for t in names.values()) == 2 * 128_000 + 3 * 100_608 + 2 * 64   # + final norm
    assert size > 2 * 128_000 + 3 * 100_608 + 2 * 64                # plus the headers
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(names)


def test_the_checkpoint_is_removed_when_a_run_fails(tmp_path, byte_tokenizer):
    root = tmp_path / "bench"
    results = tmp_path / "table.md"
    proc = bench(tmp_path, "--size-gb", "0.001", *tiny(byte_tokenizer), "--nsamples", "0", "--dir", str(root),
                 "--results", str(results))
    assert proc.returncode != 0
    assert "failed with exit 2" in proc.stderr                   # the CLI refused --nsamples 0
    assert not root.exists() and not results.exists()


def test_refused_in_one_line_when_the_disk_cannot_hold_it(tmp_path):
    root = tmp_path / "bench"
    proc = bench(tmp_path, "--size-gb", "100000", "--dir", str(root), "--results", str(tmp_path / "t.md"))
    assert proc.returncode != 0 and not root.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GB free" in lines[0] and "--size-gb" in lines[0]


def test_a_tiny_run_measures_both_children_and_cleans_up(tmp_path, byte_tokenizer):
    root, results = tmp_path / "bench", tmp_path / "table.md"
    proc = bench(tmp_path, "--size-gb", "0.001", *tiny(byte_tokenizer), "--nsamples", "2", "--seqlen", "32",
                 "--windows", "2", "--dir", str(root), "--results", str(results))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not root.exists()
    rows = [line for line in results.read_text().splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`prune --streaming --eval (wanda 50%)`", "`eval --streaming`"]
    for r in rows:
        rss, hwm = (float(c.split()[0]) for c in r.split("|")[2:4])
        assert 0.1 < rss < 8 and 0.1 < hwm <= rss + 0.01          # GiB: a Python with torch, and VmHWM <= maxrss


def test_projection_of_a_hand_computed_case():
    counts = Counter({(2, 3): 4, (4, 5): 2})
    seconds = {(2, 3): 1.0, (4, 5): 3.0}
    # 2 x (4 x 6 + 2 x 20) = 128 bytes at 10 bytes/s: 12.8 s of reading
    two = projection.project(counts, seconds, 10.0, 2)
    assert two["compute_s"] == 5.0 and two["read_s"] == pytest.approx(12.8)    # 3+1+1 on each GPU
    assert two["overlapped_s"] == pytest.approx(12.8) and two["serial_s"] == pytest.approx(17.8)
    assert projection.project(counts, seconds, 10.0, 1)["compute_s"] == 10.0
    assert projection.project(counts, seconds, 10.0, 4)["compute_s"] == 3.0     # 3 | 3 | 1+1 | 1+1
    assert projection.project(counts, seconds, 1e9, 8)["overlapped_s"] == 3.0


def test_the_real_models_shapes_and_bytes():
    c70 = projection.shape_counts(projection.MODELS["LLaMA-2-70B"])
    assert c70 == {(8192, 8192): 160, (1024, 8192): 160, (28672, 8192): 160, (8192, 28672): 80}
    c405 = projection.shape_counts(projection.MODELS["LLaMA-3.1-405B"])
    assert sum(c405.values()) == 882
    # by hand: 126 x (2 x 16384^2 + 2 x 1024 x 16384 + 3 x 53248 x 16384) x 2 bytes
    assert projection.project(c405, dict.fromkeys(c405, 1.0), 1e9, 1)["read_gb"] == pytest.approx(803.293102080)


def test_estimated_times_follow_a_gram_plus_eigensolver_fit():
    # times made from a = 1e-9, b = 2e-9 s: t = a m n^2 + b n^3
    measured = {"100x100": (1e-9 * 1e6 + 2e-9 * 1e6) * 1000, "100x400": (1e-9 * 4e6 + 2e-9 * 1e6) * 1000}
    got = projection.fitted_seconds(measured, [(200, 800)])[(200, 800)]
    assert got == pytest.approx(1e-9 * 800 * 200**2 + 2e-9 * 200**3)
