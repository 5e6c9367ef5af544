"""The run layout: one directory scheme for LessSFTTrainer(output_dir) and hf-less --run_dir (issue 17)."""

import pytest

from hf_less import cli
from hf_less.training.layout import RunLayout


def test_the_stages_live_under_less_prefixed_directories(tmp_path):
    layout = RunLayout(str(tmp_path))
    assert layout.root == tmp_path
    assert layout.warmup == tmp_path / "less_warmup"
    assert layout.features == tmp_path / "less_features" and layout.store == tmp_path / "less_features" / "pool"
    assert layout.selection("topk") == tmp_path / "selections" / "topk"


def test_a_run_dir_with_the_old_cli_names_is_refused_with_the_rename(tmp_path, capsys):
    (tmp_path / "warmup").mkdir()
    (tmp_path / "features").mkdir()
    with pytest.raises(FileExistsError) as e:
        RunLayout(tmp_path).check_not_old()
    assert "hf-less 0.1" in str(e.value)
    assert f"mv {tmp_path / 'warmup'} {tmp_path / 'less_warmup'}" in str(e.value)
    assert f"mv {tmp_path / 'features'} {tmp_path / 'less_features'}" in str(e.value)
    assert cli.main(["report", "--run_dir", str(tmp_path)]) == 1
    assert "hf-less 0.1" in capsys.readouterr().err
    (tmp_path / "less_warmup").mkdir()
    (tmp_path / "less_features").mkdir()
    RunLayout(tmp_path).check_not_old()  # renamed (or both present): accepted
