"""spark_ext.progress: one bar for calibration, the demo and the studies; quiet shows nothing."""

import sys

from spark_ext.progress import progress


def test_iterates_and_updates_with_or_without_tqdm(monkeypatch, capsys):
    for tqdm_missing in (False, True):
        if tqdm_missing:
            monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the plain counter
        capsys.readouterr()
        assert list(progress(range(3), "loop", quiet=True)) == [0, 1, 2]
        assert capsys.readouterr().err == ""
        assert list(progress(iter("ab"), "loop", total=2)) == ["a", "b"]
        bar = progress(desc="manual", total=2)
        bar.update(1)
        bar.set_postfix_str("half")
        bar.update(1)
        bar.close()
    err = capsys.readouterr().err
    assert "loop: 2" in err and "manual: 2" in err  # the counter's lines
