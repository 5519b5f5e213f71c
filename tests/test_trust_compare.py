"""A table given to `spectrascope compare` that cannot be compared (a column missing, a block or a
metric that is not a number) is refused in one line naming the file and the row, exit 2, before
anything is written: never a KeyError traceback or a pandas message without the file."""
from __future__ import annotations

import pandas as pd
import pytest

from core.cli import main as cli

GOOD = pd.DataFrame({"name": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"], "block": [0, 1],
                     "kind": ["up", "up"], "alpha": [3.0, 4.0], "status": ["ok", "ok"]})


@pytest.mark.parametrize("damage, named", [
    (lambda t: t.drop(columns="status"), "lacks the columns status"),
    (lambda t: t.drop(columns=["block", "kind"]), "lacks the columns block, kind"),
    (lambda t: t.assign(block=["0", "x"]), "row 2 ('model.layers.1.mlp.up_proj'): block 'x' is not a whole number"),
    (lambda t: t.assign(block=[0.5, 1]), "row 1 ('model.layers.0.mlp.up_proj'): block 0.5 is not a whole number"),
    (lambda t: t.assign(block=[0, None]), "row 2 ('model.layers.1.mlp.up_proj'): block is empty"),
    (lambda t: t.assign(alpha=["3.0", "high"]), "row 2 ('model.layers.1.mlp.up_proj'): alpha 'high' is not a number"),
])
def test_a_table_that_cannot_be_compared_is_one_line_naming_it(tmp_path, capsys, damage, named):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    GOOD.to_csv(good, index=False)
    damage(GOOD.copy()).to_csv(bad, index=False)
    out = tmp_path / "cmp"
    assert cli(["compare", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and named in err[0], err
    assert not list(tmp_path.glob("cmp*"))


def test_a_sound_pair_of_tables_still_compares(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    GOOD.to_csv(a, index=False)
    GOOD.assign(alpha=[3.5, 4.0]).to_csv(b, index=False)
    assert cli(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    deltas = pd.read_csv(tmp_path / "cmp-deltas.csv").set_index("key")
    assert deltas.loc["model.layers.0.mlp.up_proj", "delta_alpha"] == pytest.approx(0.5)
