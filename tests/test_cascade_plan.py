"""``python -m pretrain plan --cascade``: the arithmetic against numbers computed here independently, FLOP counts
against the MAC counter of ``pretrain.scale``, and the errors for bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from pretrain.engine import cascade_plan
from pretrain.engine.cascade_plan import PlanError, plan_cascade, read_calibration, train_flops_per_image

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'stage' / 'supervised_tiny.yaml')  # internimage_t, channels 16, ZeRO-2 bf16, EMA
TINY_KWARGS = {'channels': 16, 'depths': [1, 1, 2, 1], 'groups': [1, 2, 4, 8]}


def _cascade(tmp_path: Path, stages: list[dict], resources: dict | None = None) -> Path:
    path = tmp_path / 'cascade.yaml'
    path.write_text(yaml.safe_dump({
        'name': 'plan_test', 'runs_root': str(tmp_path / 'runs'),
        'resources': resources or {'nodes': 1, 'tasks_per_node': 2, 'cpus_per_task': 3, 'timeout_min': 60,
                                   'signal_delay_s': 120, 'max_requeues': 3},
        'stages': stages}))
    return path


def _report(tmp_path: Path, rows: list[dict] | None, part: str = 'h1gpu') -> Path:
    path = tmp_path / 'gpu-report.json'
    parts = {'throughput': {'status': 'passed', 'rows': [{'model': 'internimage_t', 'batch': 64,
                                                          'images_per_s': 584.0}]}}
    if rows is not None:
        parts[part] = {'status': 'passed', 'rows': rows}
    path.write_text(json.dumps({'machine': {'gpu': 'test'}, 'parts': parts}))
    return path


ROWS = [
    {'model': 'internimage_t', 'objective': 'supervised', 'img_size': 64, 'batch': 8, 'images_per_s': 100.0,
     'peak_mem_gib': 1.0, 'gpu': 'NVIDIA H100 80GB HBM3'},
    {'model': 'internimage_t', 'objective': 'supervised', 'img_size': 64, 'batch': 16, 'images_per_s': 150.0,
     'peak_mem_gib': 1.5, 'gpu': 'NVIDIA H100 80GB HBM3'},
    {'model': 'internimage_t', 'objective': 'supervised', 'img_size': 64, 'batch': 32, 'error': 'out of memory'},
    {'model': 'internimage_t', 'objective': 'supervised', 'img_size': 224, 'batch': 8, 'images_per_s': 900.0},
    {'model': 'internimage_h', 'objective': 'm3i', 'img_size': 224, 'batch': 32, 'images_per_s': 999.0},
]


def _params(overrides: list[str]) -> int:
    """Trained parameters, counted on a real CPU build (the plan counts on the meta device)."""
    from pretrain.config import load_config
    from pretrain.objectives import build_model
    return sum(p.numel() for p in build_model(load_config(TINY, overrides)).parameters() if p.requires_grad)


def test_forward_flops_match_the_mac_counter_of_scale():
    """FlopCounterMode (with the DCNv3 formula) = 2 x the MACs that pretrain.scale counts (convolutions, linear
    layers and the DCNv3 core as the official get_flops.py), for the tiny InternImage at two sizes."""
    from pretrain.config import load_config
    from pretrain.scale import _count
    for size in (64, 128):
        cfg = load_config(TINY, [f'data.img_size={size}', 'model.grad_checkpointing=false'])
        flops = train_flops_per_image(cfg)
        _, macs = _count(TINY_KWARGS, img_size=size)
        assert flops['forward'] == pytest.approx(2 * macs, rel=0.02), size
        assert flops['train'] == pytest.approx(3 * flops['forward']) and flops['recompute'] == 0
    ckpt = train_flops_per_image(load_config(TINY, ['model.grad_checkpointing=true']))
    plain = train_flops_per_image(load_config(TINY, ['model.grad_checkpointing=false']))
    assert 0 < ckpt['recompute'] < ckpt['forward']
    assert ckpt['train'] == pytest.approx(plain['train'] + ckpt['recompute'])


@pytest.mark.slow
def test_internimage_h_forward_matches_the_published_flops():
    """H built on the meta device (no weights): the counted forward against the paper's 188G (224 px) and the
    official README's 1478G (640 px) multiply-accumulates (official-internimage.md)."""
    from pretrain.config import load_config
    cfg = str(REPO / 'configs' / 'stage' / 'internimage_h_22kto1k_640.yaml')
    for size, published in ((224, 188e9), (640, 1478e9)):
        f = train_flops_per_image(load_config(cfg, [f'data.img_size={size}', 'model.head_index=null']))
        assert f['forward'] / 2 == pytest.approx(published, rel=0.04), size


def test_m3i_flops_count_the_teacher_and_the_text_tower():
    from pretrain.config import load_config
    cfg = load_config(str(REPO / 'configs' / 'stage' / 'demo_pretrain.yaml'))
    f = train_flops_per_image(cfg)
    kwargs = cfg.model.kwargs  # the demo's backbone, as a plain supervised run
    backbone = train_flops_per_image(load_config(TINY, [
        'data.img_size=64', 'model.grad_checkpointing=false', 'model.num_classes=10',
        f"model.kwargs={{channels: {kwargs['channels']}, depths: {kwargs['depths']}, groups: {kwargs['groups']}}}"]))
    assert f['teacher'] == pytest.approx(backbone['forward'], rel=0.01)  # the teacher: one backbone forward
    c = cfg.objective.contrastive  # the text tower's projections and MLP alone: 2 x (4 + 8) w^2 FLOPs per token
    text_matmuls = 24 * c.text_width ** 2 * c.context_length * c.text_layers
    assert f['forward'] - backbone['forward'] > text_matmuls  # + text tower (and its attention), decoder, head
    assert f['train'] == pytest.approx(3 * f['forward'] + f['recompute'] + f['teacher'])


def test_arithmetic_of_a_two_stage_plan(tmp_path):
    over_a = ['data.mode=resampled', 'data.samples_per_epoch=1000', 'schedule.epochs=3', 'schedule.warmup_steps=2',
              'checkpoint.interval_steps=50', 'model.grad_checkpointing=false']
    over_b = ['schedule.epochs=2', 'data.img_size=128', 'checkpoint.interval_steps=7', 'ema.enabled=false',
              'model.grad_checkpointing=false']
    path = _cascade(tmp_path, [{'name': 'a', 'train_config': TINY, 'overrides': over_a},
                               {'name': 'b', 'train_config': TINY, 'overrides': over_b,
                                'resources': {'tasks_per_node': 1, 'timeout_min': 30}}])
    report = _report(tmp_path, ROWS)
    p = plan_cascade(path, gpus=4, calibration=report, train_samples=['b=500'], memory=False, net_gb_per_s=2.0,
                     fs_gb_per_s=0.5, restart_min=1.0, gpu_hours_per_failure=3.0, loader_img_per_core=40.0)
    a, b = p['stages']
    assert p['measured'] and p['reference']['images_per_s'] == 150.0  # best row of the model, objective and size
    assert p['reference']['batch'] == 16 and a['measured_peak_mem_gib'] == 1.5

    # stage a: 2 ranks x micro-batch 8; resampled 1000 samples per epoch, 3 epochs
    assert a['global_batch'] == 16 and a['gpus'] == 2
    assert a['steps'] == 3 * (1000 // 16) and a['samples'] == a['steps'] * 16
    assert a['images_per_s_per_gpu'] == 150.0
    p_a = _params(over_a)
    assert a['trained_params'] == p_a
    comm_a = 2 * p_a * 2 * (2 - 1) / 2  # ZeRO-2 bf16: reduce-scatter + all-gather of the bf16 parameters
    step_a = 8 / 150 + comm_a / 2e9
    assert a['comm_gb_per_step'] == pytest.approx(comm_a / 1e9)
    assert a['step_s'] == pytest.approx(step_a)
    ckpt_a = p_a * (2 + 12 + 4)  # bf16 weights, fp32 master + Adam moments, EMA
    assert a['checkpoint_gib'] == pytest.approx(ckpt_a / 2 ** 30)
    assert a['save_s'] == pytest.approx(ckpt_a / 0.5e9)
    saves_a = a['steps'] // 50 + 1  # 186 steps: 3 interval saves and the last step
    assert a['saves'] == saves_a
    run_a = a['steps'] * step_a + saves_a * a['save_s'] + 60
    failures_a = run_a / 3600 * 2 / 3.0
    useful = 60 * 60 - 120 - 60
    requeues_a = math.ceil(run_a / useful) - 1
    loss_a = failures_a * (50 * step_a / 2 + 60) + requeues_a * (a['save_s'] + 60)
    assert a['expected_failures'] == pytest.approx(failures_a)
    assert a['preemption_loss_h'] == pytest.approx(loss_a / 3600)
    assert a['wall_h'] == pytest.approx((run_a + loss_a) / 3600)
    assert a['gpu_hours'] == pytest.approx(a['wall_h'] * 2)
    assert a['loader_cores_per_gpu'] == pytest.approx(150 / 40)
    assert a['loader_cores_short']  # 3.75 cores needed, cpus_per_task 3 leaves 2 for workers
    assert a['young_interval_steps'] == pytest.approx(math.sqrt(2 * a['save_s'] * 3.0 / 2 * 3600) / step_a)

    # stage b: 1 rank, epoch mode from --train-samples, 128 px: ~4x the FLOPs per image of a's 64 px
    assert b['global_batch'] == 8 and b['samples_per_epoch'] == 500 and b['samples_per_epoch_from'] == '--train-samples'
    assert b['steps'] == 2 * (500 // 8) and b['samples'] == b['steps'] * 8
    assert b['images_per_s_per_gpu'] == pytest.approx(150 / 4, rel=0.03)
    assert b['images_per_s_per_gpu'] == pytest.approx(150 * a['train_gflops_per_image'] / b['train_gflops_per_image'])
    assert b['comm_gb_per_step'] == 0  # one rank
    assert b['checkpoint_gib'] == pytest.approx(b['trained_params'] * 14 / 2 ** 30)  # no EMA
    assert b['saves'] == b['steps'] // 7 + (1 if b['steps'] % 7 else 0)
    assert p['total']['gpu_hours'] == pytest.approx(a['wall_h'] * 2 + b['wall_h'] * 1)
    assert p['total']['cluster_gpu_hours'] == pytest.approx((a['wall_h'] + b['wall_h']) * 4)
    assert any(x['status'] == 'measured' for x in p['assumptions'])


def test_calibration_objective_alias(tmp_path):
    """'m3i' and 'multi' name one objective, on the rows and in the call: the m3i row is taken, not the faster
    supervised one."""
    rows = [{'model': 'internimage_h', 'objective': 'supervised', 'img_size': 224, 'images_per_s': 50.0},
            {'model': 'internimage_h', 'objective': 'm3i', 'img_size': 224, 'images_per_s': 4.7}]
    for objective in ('m3i', 'multi'):
        ref = read_calibration(_report(tmp_path, rows), model='internimage_h', objective=objective, img_size=224)
        assert (ref.images_per_s, ref.objective) == (4.7, 'multi'), objective


def test_cli_text_memory_fit_and_img_per_s_override(tmp_path, capsys):
    path = _cascade(tmp_path, [{'name': 'only', 'train_config': TINY,
                                'overrides': ['schedule.epochs=null', 'schedule.total_steps=40']}])
    report = _report(tmp_path, ROWS)
    rc = cascade_plan.main(['--cascade', str(path), '--gpus', '2', '--calibration', str(report),
                            '--img-per-s', '80'])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'samples 640 = 40 steps x global batch 16' in out
    assert '80.0 images/s per GPU' in out and 'overrides --calibration' in out
    assert 'memory ' in out and '(fits;' in out
    assert 'ASSUMED THROUGHPUT' in out  # given on the command line, not measured


def test_plan_command_dispatches_cascade_and_says_when_assumed(tmp_path, capsys):
    from pretrain.engine import plan
    path = _cascade(tmp_path, [{'name': 'only', 'train_config': TINY,
                                'overrides': ['schedule.epochs=null', 'schedule.total_steps=40']}])
    assert plan.main(['--cascade', str(path), '--no-memory', '--json']) == 0
    p = json.loads(capsys.readouterr().out)
    assert not p['measured'] and p['reference']['kind'] == 'assumed' and p['gpus'] == 2
    assert p['reference']['model'] == 'internimage_b'
    assert any(x['status'] == 'assumed' and 'images/s per GPU' in x['what'] for x in p['assumptions'])


def test_epoch_stage_without_readable_shards(tmp_path):
    gone = tmp_path / 'nothing'
    known = _cascade(tmp_path, [{'name': 'in1k', 'train_config': TINY, 'overrides': [
        f'data.train=[{{name: imagenet1k, urls: "{gone}/s-{{000000..000001}}.tar"}}]']}])
    p = plan_cascade(known, img_per_s=100.0, memory=False)
    s = p['stages'][0]
    assert s['samples_per_epoch'] == 1_281_167 and s['samples_per_epoch_assumed']
    assert s['steps'] == 4 * (1_281_167 // 16)
    unknown = _cascade(tmp_path, [{'name': 'mine', 'train_config': TINY, 'overrides': [
        f'data.train=[{{name: mine, urls: "{gone}/s-{{000000..000001}}.tar"}}]']}])
    with pytest.raises(PlanError, match=r'stage mine: epoch mode.*--train-samples mine=N'):
        plan_cascade(unknown, img_per_s=100.0, memory=False)


@pytest.mark.parametrize('rows, part, message', [
    (None, 'h1gpu', r'parts\.h1gpu\.rows: missing or empty \(the report has parts \[\'throughput\'\]'),
    ([], 'h1gpu', r'parts\.h1gpu\.rows: missing or empty'),
    ([{'model': 'internimage_t', 'batch': 8, 'error': 'out of memory'}], 'h1gpu',
     r'no row of internimage_t measured images_per_s \(batch 8: out of memory\)'),
    ([{'model': 'convnext_tiny', 'batch': 8, 'images_per_s': 5.0}], 'h1gpu',
     r"no row of internimage_t \(rows of \['convnext_tiny'\]\)"),
])
def test_calibration_errors_name_the_file_and_key(tmp_path, rows, part, message):
    report = _report(tmp_path, rows, part)
    with pytest.raises(PlanError, match=message) as err:
        read_calibration(report, model='internimage_t', objective='supervised', img_size=64)
    assert str(report) in str(err.value)


def test_cli_errors(tmp_path, capsys):
    path = _cascade(tmp_path, [{'name': 'only', 'train_config': TINY}])
    missing = tmp_path / 'no-report.json'
    assert cascade_plan.main(['--cascade', str(path), '--calibration', str(missing), '--no-memory']) == 2
    assert f'--calibration {missing}: no such file' in capsys.readouterr().err
    bad = tmp_path / 'bad.json'
    bad.write_text('{not json')
    assert cascade_plan.main(['--cascade', str(path), '--calibration', str(bad), '--no-memory']) == 2
    assert 'not JSON' in capsys.readouterr().err
    assert cascade_plan.main(['--cascade', str(path), '--gpus', '1', '--no-memory']) == 2
    assert 'stage only asks for 2 GPUs' in capsys.readouterr().err
    assert cascade_plan.main(['--cascade', str(path), '--train-samples', 'other=5', '--no-memory']) == 2
    assert "no stage 'other'" in capsys.readouterr().err
    assert cascade_plan.main(['--cascade', str(path), '--img-per-s', '0', '--no-memory']) == 2
    assert '--img-per-s must be > 0' in capsys.readouterr().err
    assert cascade_plan.main(['--cascade', str(tmp_path / 'none.yaml'), '--no-memory']) == 2
    assert 'none.yaml' in capsys.readouterr().err
