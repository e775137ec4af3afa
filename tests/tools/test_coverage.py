"""`python -m fastres coverage`: pairs, blocks and ops per forward before and after optimize()."""
import pytest

from fastres.tools import coverage
from fastres.tools.cli import main


def test_resnet18_is_fully_covered(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    r = coverage.measure("tv:resnet18", size=32)
    assert (r.pairs, r.pairs_fused, r.blocks, r.blocks_fused, r.pairs_counted_by) == (20, 20, 8, 8, "fx")
    # 8 blocks x 2 launches and the stem, where eager runs 3 ops per conv + BN + ReLU
    assert r.launches_after < r.launches_before / 2


def test_timm_model_with_chains_and_a_table_row(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    r = coverage.measure("timm:mobilenetv2_050", size=32)
    assert r.pairs == 52 and r.pairs_fused == 52  # its 17 depthwise convs included
    assert "| timm:mobilenetv2_050 | 52/52 | 10/10 |" in coverage.table([r])


def test_command_line(capsys, monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    assert main(["coverage", "--size", "32", "tv:resnet18", "timm:mobilenetv2_050"]) == 0
    out = capsys.readouterr().out
    assert "| tv:resnet18 | 20/20 | 8/8 |" in out and "| all 2 | 72/72 (100.0%) |" in out
    assert main(["coverage", "tv:no_such_model"]) == 2
    with pytest.raises(SystemExit):
        main(["coverage"])
