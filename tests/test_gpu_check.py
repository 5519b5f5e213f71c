"""benchmarks/gpu_check.py runs end to end with scaled-down shapes on the CPU and prints its table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_small_on_cpu_prints_the_table(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| check | result | goal |"
    assert all(line.count("|") == 4 for line in lines)                  # three cells in every row
    checks = [line.split("|")[1].strip() for line in lines[2:]]
    assert checks[0] == "CUDA tests (pytest -m cuda)" and "skipped (no CUDA device)" in lines[2]
    assert "analysis: 28 matrices (spectra + fits + metrics)" in checks
    assert any(c.startswith("wanda, one block, 1024 calibration tokens") for c in checks)
    assert any(c.startswith("sparsegpt, one block") for c in checks)
    res = json.loads(out.read_text())
    assert res["analysis"]["matrices"] == 28 and res["analysis"]["fitted"] > 0
    assert res["analysis"]["max_rel_eig_error"] < 1e-12                 # float64 on both sides here
    for m in ("wanda", "sparsegpt"):
        assert abs(res[m]["achieved"] - 0.5) < 0.01 and res[m]["tokens"] == 8 * 128
    assert set(res["per_matrix_ms"]) == {"256x256", "256x688", "688x256"}
    # the projection stage: every distinct shape of the 70B and 405B models / 32, timed here
    proj = res["projection"]
    assert set(proj["per_shape_ms"]) == {"256x256", "32x256", "896x256", "256x896",
                                         "512x512", "32x512", "1664x512", "512x1664"}
    assert proj["read_gb_per_s"] > 0 and "posix_fadvise" in proj["read_method"]
    assert [(r["model"], r["gpus"]) for r in proj["projection"]] == [
        (m, g) for m in ("LLaMA-2-70B / 32", "LLaMA-3.1-405B / 32") for g in (1, 2, 4, 8)]
    assert sum(c.startswith("projected analysis, ") for c in checks) == 8
    # streamed evaluation from a checkpoint on disk: the in-memory perplexity, block by block
    streamed = res["streamed_eval"]
    assert streamed["blocks"] == 2 and streamed["rel_diff"] < 1e-4
    assert any(c.startswith("streamed evaluation, 2 blocks") for c in checks)
    # 2:4 deployment: on the CPU the kernels are refused with the reason, dense is still timed,
    # the pruned model is 2:4 everywhere, and the saved zeros compress (the dense block does not)
    deploy = res["deploy_24"]
    assert deploy["kernels"].startswith("semi-structured sparse kernels need a CUDA GPU")
    assert len(deploy["matmul"]) == 9 and all(m["dense_ms"] > 0 and "sparse_ms" not in m for m in deploy["matmul"])
    gen = deploy["generation"]
    assert gen["two_of_four"] == gen["matrices"] == 14 and set(gen["dense_tok_s"]) == {"1", "4"}
    disk = {d["model"]: d for d in deploy["disk"]}
    assert len({d["bytes"] for d in disk.values()}) == 1                  # --save writes the same bytes
    assert disk["dense"]["zlib_bytes"] > 0.9 * disk["dense"]["bytes"]      # random float16: incompressible
    assert disk["2:4"]["zlib_bytes"] < 0.8 * disk["dense"]["zlib_bytes"]
    assert sum(c.startswith("2:4 matmul ") for c in checks) == 9
    assert any(c.startswith("generation, 2-block 2:4 LLaMA, batch 4") for c in checks)
