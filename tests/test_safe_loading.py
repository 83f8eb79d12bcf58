"""Checkpoint files from elsewhere are loaded without running code from them (pretrain.common.safe_load).

The planted file is a real pickle that would create a file when unpickled without restriction (the test shows it
does, under ``trust_pickle``); export and resume must refuse it, naming the file and the type, with nothing run.
The real files come from the real Trainer under ZeRO-0 and ZeRO-2 (tests/test_export.py's worker)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.common.safe_load import UnsafeCheckpointError, check_folder, safe_load
from tests.test_engine import _env, shards  # noqa: F401 - the shards fixture

REPO = Path(__file__).resolve().parents[1]
THIS = str(Path(__file__).resolve())
EXPORT_TEST = str(REPO / 'tests' / 'test_export.py')


class _OpensAFile:
    """Unpickled without restriction, this calls ``open(path, 'w')``: the file appearing is the code having run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch.save'd dict whose pickle creates ``marker`` when loaded unrestricted."""
    path.unlink(missing_ok=True)
    torch.save({'module': {}, 'payload': _OpensAFile(marker)}, path)


def test_a_pickle_that_runs_code_is_refused_naming_the_file_and_type(tmp_path):
    marker, bad = tmp_path / 'pwned', tmp_path / 'model.pt'
    plant(bad, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf'{bad}: refused to load: it needs io.open'):
        safe_load(bad)
    with pytest.raises(UnsafeCheckpointError, match=str(bad)):
        check_folder(tmp_path)
    assert not marker.exists()
    safe_load(bad, trust_pickle=True)  # the user's explicit way out, and proof that the planted file is live
    assert marker.exists()


def test_the_allowed_types_load_and_others_do_not(tmp_path):
    import argparse

    rng = {'numpy': np.random.RandomState(3).get_state(), 'torch': torch.get_rng_state(), 'ns': argparse.Namespace(a=1)}
    torch.save(rng, tmp_path / 'rng.pt')
    back = safe_load(tmp_path / 'rng.pt')
    assert back['numpy'][0] == 'MT19937' and np.array_equal(back['numpy'][1], rng['numpy'][1])
    assert torch.equal(back['torch'], rng['torch']) and back['ns'].a == 1
    torch.save({'x': np.random.default_rng(0)}, tmp_path / 'gen.pt')  # a Generator is not on the list
    with pytest.raises(UnsafeCheckpointError, match=r'gen.pt: refused to load: it needs .*numpy.random'):
        safe_load(tmp_path / 'gen.pt')
    (tmp_path / 'legacy.pt').write_bytes(b'\x80\x02}q\x00.')  # a bare pickle, not torch.save's zip
    with pytest.raises(UnsafeCheckpointError, match=r'legacy.pt: refused to load: it needs a pickle that cannot'):
        safe_load(tmp_path / 'legacy.pt')


@pytest.fixture(scope='module')
def runs(shards, tmp_path_factory) -> Path:  # noqa: F811
    """ZeRO-0 and ZeRO-2 runs of 2 steps (one checkpoint each) from the real Trainer."""
    out = tmp_path_factory.mktemp('safe_loading')
    res = subprocess.run([sys.executable, EXPORT_TEST, 'train', str(out), shards, 'z0:0', 'z2:2'], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out


def _step_dir(run: Path) -> Path:
    return run / 'checkpoints' / 'step_00000002'


@pytest.mark.slow
@pytest.mark.parametrize('name', ['z0', 'z2'])
def test_real_checkpoint_files_pass_the_allow_list(runs, name):
    files = sorted(_step_dir(runs / name).rglob('*.pt'))
    assert {f.name for f in files} >= {'trainer.pt', 'rank_00000.pt', 'ema_00000.pt'}
    for f in files:
        safe_load(f, mmap=True)


@pytest.mark.slow
@pytest.mark.parametrize('name, planted', [('z0', 'global_step2/mp_rank_00_model_states.pt'),
                                           ('z2', 'global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt')])
def test_export_refuses_a_planted_deepspeed_file(runs, name, planted, tmp_path, capsys):
    from pretrain.export import main

    run = tmp_path / name
    shutil.copytree(runs / name, run)
    marker, bad = tmp_path / 'pwned', _step_dir(run) / planted
    plant(bad, marker)
    assert main([str(run), '--format', 'official', '--out', str(tmp_path / 'x.pth')]) == 2
    err = capsys.readouterr().err
    assert f'{bad}: refused to load: it needs io.open' in err and '--trust-pickle' in err, err
    assert not marker.exists() and not (tmp_path / 'x.pth').exists()


def _resume_worker(run: str, urls: str, zero: int) -> None:
    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer
    from tests.test_export import _train_config

    cfg = _train_config(run, urls, zero, m3i=False)
    cfg['schedule']['total_steps'] = 4
    Trainer(config_from_dict(cfg)).train()


@pytest.mark.slow
@pytest.mark.parametrize('planted', ['global_step2/mp_rank_00_model_states.pt', 'trainer.pt', 'rank_00000.pt'])
def test_resume_refuses_a_planted_file(runs, shards, planted, tmp_path):  # noqa: F811
    run = tmp_path / 'z0'
    shutil.copytree(runs / 'z0', run)
    marker, bad = tmp_path / 'pwned', _step_dir(run) / planted
    plant(bad, marker)
    res = subprocess.run([sys.executable, THIS, 'resume', str(run), shards, '0'], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stdout[-2000:]
    assert f'{bad}: refused to load: it needs io.open' in res.stderr, res.stderr[-3000:]
    assert not marker.exists()
    assert not (run / 'checkpoints' / 'step_00000004').exists()


if __name__ == '__main__':
    if sys.argv[1] == 'resume':
        sys.path.insert(0, str(REPO))
        os.chdir(REPO)
        _resume_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
