"""``python -m launch status RUN --plot``: learning curves of every stage of a run folder (or one training output
folder), from the metrics.jsonl files the engine's MetricsLogger writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from launch.config import load_cascade
from launch.run import create_run
from launch.status import learning_curves_figure, plot_run
from pretrain.engine.metrics import MetricsLogger
from tests.conftest import REPO_ROOT


def log_stage(out_dir: Path, steps: int, parts: list[str], eval_key: str, accuracy_end: float) -> None:
    """Metrics as the trainer logs them: decaying loss parts and a rising eval top-1 every 10 steps."""
    logger = MetricsLogger(str(out_dir), enabled=True, tensorboard=False, progress=False)
    for step in range(5, steps + 1, 5):
        loss = {part: 2.0 * (1 + i) / step for i, part in enumerate(parts)}
        logger.log(step, {'loss': {'total': sum(loss.values()), **loss}, 'lr': 1e-3 * step / steps})
        if step % 10 == 0:
            top1 = accuracy_end * step / steps
            logger.log(step, {'raw': {eval_key: {'top1': top1 - 1}}, 'ema': {eval_key: {'top1': top1}}},
                       prefix='eval')
    logger.close()


@pytest.fixture
def two_stage_run(tmp_path, monkeypatch, real_data):
    monkeypatch.chdir(REPO_ROOT)
    cascade = tmp_path / 'c.yaml'
    # a shard that exists: submission checks the paths a job would read (nothing is trained here)
    data = [f'data.train=[{{name: t, urls: "{real_data / "cc12m-train-0000.tar"}"}}]', 'data.val=[]']
    cascade.write_text(yaml.safe_dump({'name': 'plot', 'runs_root': str(tmp_path / 'runs'), 'stages': [
        {'name': 'pretrain', 'train_config': 'configs/stage/supervised_tiny.yaml', 'overrides': data},
        {'name': 'finetune', 'train_config': 'configs/stage/supervised_tiny.yaml', 'overrides': data}]}))
    run = create_run(load_cascade(cascade), 'local', 'cascade', snapshot=False)
    log_stage(run.stage_dir('pretrain') / 'out', 40, ['contrastive', 'mim'], 'zero_shot', 60.0)
    log_stage(run.stage_dir('finetune') / 'out', 30, ['ce'], 'classifier', 90.0)
    return run


def test_figure_has_every_stage_boundary_loss_part_and_accuracy(two_stage_run):
    run = two_stage_run
    stages = [(n, run.stage_dir(n) / 'out') for n in ('pretrain', 'finetune')]
    fig = learning_curves_figure(stages, title='t', references={'published': 94.9})
    ax_loss, ax_lr, ax_acc = fig.axes
    lines = {line.get_label(): line for line in ax_loss.get_lines() if not line.get_label().startswith('_')}
    # A stage with one loss part shows that part only (its total is the same curve).
    assert set(lines) == {'pretrain: total', 'pretrain: contrastive', 'pretrain: mim', 'finetune: ce'}
    # The second stage goes on after the first one's last step (40), where a boundary is drawn on every panel.
    assert lines['finetune: ce'].get_xdata()[0] == 45 and lines['pretrain: mim'].get_xdata()[-1] == 40
    for ax in fig.axes:
        assert sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith('_')
                      and len(set(line.get_xdata())) == 1) == [0, 40]
    acc = {line.get_label(): line for line in ax_acc.get_lines() if not line.get_label().startswith('_')}
    assert set(acc) == {'pretrain: raw zero_shot top1', 'pretrain: ema zero_shot top1',
                        'finetune: raw classifier top1', 'finetune: ema classifier top1'}
    assert acc['finetune: ema classifier top1'].get_ydata()[-1] == pytest.approx(90.0)
    assert any(list(line.get_ydata()) == [94.9, 94.9] for line in ax_acc.get_lines())  # the reference line
    assert ax_lr.get_lines()[0].get_ydata()[-1] == pytest.approx(1e-3)


def test_status_plot_cli_on_a_run_and_on_one_output_folder(two_stage_run):
    run = two_stage_run
    res = subprocess.run([sys.executable, '-m', 'launch', 'status', str(run.root), '--plot'], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    png = run.root / 'learning_curves.png'
    assert f'plot: {png}' in res.stdout, res.stdout + res.stderr
    pixels = np.asarray(Image.open(png).convert('L'))
    assert pixels.shape == (506, 1650) and pixels.std() > 10  # 15 x 4.6 in at 110 dpi, not blank
    out = run.stage_dir('finetune') / 'out'
    res = subprocess.run([sys.executable, '-m', 'launch', 'status', str(out), '--plot'], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and f'plot: {out / "learning_curves.png"}' in res.stdout, res.stdout + res.stderr


def test_plot_without_metrics_names_the_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='is not a run folder'):
        plot_run(empty)
