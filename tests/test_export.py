"""``python -m pretrain export``: consolidation from real DeepSpeed checkpoints (ZeRO 0/1/2/3 on one rank, ZeRO-3 on
two; EMA on; the bare backbone and an M3I stage, whose module wraps the backbone beside a text tower, projections and
a MIM decoder, with a MIM teacher) and every format loaded back the way its users load it, with outputs identical to
the model holding the weights the engine had in memory.

The checkpoints come from this file's ``__main__`` worker: the real Trainer (``Trainer(cfg).train()``) for 2 steps on
real shards (M3I: also the real image-text pairs), in fp32 (so the consolidated fp32 master weights equal the module
weights bit for bit), with the EMA at decay 0.5 (far from the raw weights). Every model uses the reference operator
``DCNv3_pytorch``: exact comparisons, no kernel build.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.conftest import REAL_DATA
from tests.test_engine import _env, run_procs, shards  # noqa: F401 - the shards fixture

REPO = Path(__file__).resolve().parents[1]
THIS = str(Path(__file__).resolve())
NAME = 'internimage_t'
KWARGS = {'channels': 16, 'depths': [1, 1, 2, 1], 'groups': [1, 2, 4, 8]}
OP = {'core_op': 'DCNv3_pytorch'}
NUM_CLASSES = 200  # the test shards' labels are 0..199
STEPS, MICRO = 2, 4
SPEC_KEYS = REPO.parent / 'shared' / 'spec' / 'internimage_state_dict_keys'


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: thread start-up and spinning cost more than they gain, ten times more on a shared, loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(**kw) -> nn.Module:
    from pretrain.models import create_backbone
    return create_backbone(NAME, **{'num_classes': NUM_CLASSES, **KWARGS, **OP, **kw}).eval()


def with_int_buffers(avg: dict, raw: dict) -> dict:
    """An EMA state_dict completed with the integer buffers, which are not averaged."""
    return {k: avg.get(k, v) for k, v in raw.items()}


def strip_backbone(sd: dict) -> dict:
    return {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f'{what}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}'
    diff = [k for k in a if not torch.equal(a[k], b[k].to(a[k].dtype))]
    assert not diff, f'{what}: {len(diff)} tensors differ, e.g. {diff[:3]}'


# ----------------------------------------------------------------------------------------------------------------
# loading every format back


def assert_formats_load(files: dict, expected: dict, meta, weights: str, num_classes: int = NUM_CLASSES) -> None:
    """Every written file, loaded as its users load it, computes what a model holding ``expected`` computes."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pretrain.export import ExportMeta
    from pretrain.models import create_backbone, load_checkpoint

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = model(num_classes=num_classes)
    ref.load_state_dict(expected, strict=True)
    with torch.no_grad():
        logits = ref(x)
        feats = ref.forward_intermediates(x, intermediates_only=True)

    def same_logits(m: nn.Module, what: str) -> None:
        with torch.no_grad():
            assert torch.equal(m.eval()(x), logits), what

    # official: {'model': ...} with exactly the model's keys; strict load
    obj = torch.load(files['official'], map_location='cpu', weights_only=True)
    assert set(obj) == {'model', 'meta'} and obj['meta']['weights'] == weights
    assert_same(obj['model'], expected, 'official file')
    m = model(num_classes=num_classes)
    assert load_checkpoint(m, files['official'], strict=True).ok
    same_logits(m, 'official')

    # timm: the folder by name, and the file through pretrained_cfg_overlay
    same_logits(timm.create_model(f'local-dir:{files["timm"]}', pretrained=True, **OP), 'timm local-dir')
    m = timm.create_model(NAME, pretrained=True, num_classes=num_classes, **KWARGS, **OP,
                          pretrained_cfg_overlay=dict(file=str(files['timm'] / 'model.safetensors'),
                                                      num_classes=num_classes))
    same_logits(m, 'timm pretrained_cfg_overlay')
    cfg = json.loads((files['timm'] / 'config.json').read_text())
    assert cfg['architecture'] == NAME
    assert cfg['model_args'] == {**KWARGS, 'num_classes': num_classes, 'global_pool': 'avg'}  # timm adds the pool

    # safetensors: the tensors and the metadata
    sd = load_file(str(files['safetensors']))
    assert_same(sd, expected, 'safetensors')
    m = model(num_classes=num_classes)
    m.load_state_dict(sd, strict=True)
    same_logits(m, 'safetensors')
    with safe_open(str(files['safetensors']), 'pt') as f:
        md = f.metadata()
    assert md['weights'] == weights and md['model'] == NAME and json.loads(md['model_kwargs']) == KWARGS
    assert md['source'] == meta.source and ExportMeta.from_safetensors(md) == meta  # step, samples seen, config ...

    # backbone: patch_embed + levels only, loaded strictly into a features_only model (timm prunes the head as the
    # mmdet/mmseg InternImage has none); what those backbones' init_weights do with the file misses nothing
    obj = torch.load(files['backbone'], map_location='cpu', weights_only=True)
    bb = obj['state_dict']
    assert {k.split('.')[0] for k in bb} == {'patch_embed', 'levels'}
    assert bb.keys() == {k for k in expected if k.split('.')[0] in ('patch_embed', 'levels')}
    f = create_backbone(NAME, features_only=True, checkpoint_path=files['backbone'], **KWARGS, **OP).eval()
    assert f.load_report.ok, f.load_report
    with torch.no_grad():
        got = f(x)
    assert all(torch.equal(a, b) for a, b in zip(got, feats, strict=True)), 'backbone features'
    ckpt = obj.get('state_dict') or obj.get('model') or obj  # official mmdet_custom InternImage.init_weights
    state = {k.removeprefix('backbone.'): v for k, v in ckpt.items()}
    result = create_backbone(NAME, features_only=True, **KWARGS, **OP).model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys


def write_all(sd: dict, meta, folder: Path) -> dict:
    from pretrain.export import FORMATS, default_path, write
    files = {fmt: default_path(fmt, meta, folder) for fmt in FORMATS}
    for fmt, path in files.items():
        write(sd, meta, fmt, path)
    return files


# ----------------------------------------------------------------------------------------------------------------
# fast: weights files, layouts, refusals (no DeepSpeed)


def test_file_round_trip_wrapper_layout_and_ema(tmp_path):
    """A consolidated file in the M3I wrapper layout with raw and EMA weights -> every format -> loads back."""
    from pretrain.export import ExportError, consolidate

    torch.manual_seed(0)
    raw_model, ema_model = model(), model()
    raw, ema = raw_model.state_dict(), ema_model.state_dict()
    path = tmp_path / 'wrapped.pth'
    extra = {'text.weight': torch.randn(8, 8), 'text.bias': torch.zeros(8), 'logit_scale': torch.ones([])}
    torch.save({'model': {**{f'backbone.{k}': v for k, v in raw.items()}, **extra},
                'model_ema': {**{f'backbone.{k}': v for k, v in ema.items()}, **extra}}, path)

    with pytest.raises(ExportError, match='does not say which model'):
        consolidate(path)
    with pytest.raises(ExportError, match='shape mismatch'):
        consolidate(path, model=NAME, model_kwargs={**KWARGS, 'channels': 32})
    with pytest.raises(ExportError, match='no teacher weights'):
        consolidate(path, 'teacher', model=NAME, model_kwargs=KWARGS)

    sd, meta = consolidate(path, model=NAME, model_kwargs={**KWARGS, **OP})
    assert_same(sd, raw, 'raw')
    assert meta.dropped == ['text.* (2)', 'logit_scale'] and meta.num_classes == NUM_CLASSES
    assert meta.model_kwargs == KWARGS  # the operator is not part of the architecture
    files = write_all(sd, meta, tmp_path / 'raw')
    assert_formats_load(files, raw, meta, 'raw')

    sd, meta = consolidate(path, 'ema', model=NAME, model_kwargs=KWARGS)
    assert_same(sd, ema, 'ema')
    files = write_all(sd, meta, tmp_path / 'ema')
    assert_formats_load(files, ema, meta, 'ema')
    # our files say what they hold: re-consolidating needs no model name, and keeps the EMA flag
    for fmt in ('official', 'safetensors', 'timm'):
        again, m = consolidate(files[fmt], 'ema')
        assert_same(again, ema, fmt)
        assert (m.model, m.model_kwargs, m.weights) == (NAME, KWARGS, 'ema'), fmt


def test_official_keys_of_a_released_size(tmp_path):
    """InternImage-T with 1000 classes: the official file has exactly the keys and shapes of the official release."""
    from pretrain.export import consolidate, write
    from pretrain.models import create_backbone

    src = tmp_path / 't.pth'
    torch.save({'model': create_backbone(NAME, **OP).state_dict()}, src)
    sd, meta = consolidate(src, model=NAME)
    write(sd, meta, 'official', tmp_path / 'official.pth')
    got = torch.load(tmp_path / 'official.pth', weights_only=True)['model']
    rows = [line.split('\t') for line in (SPEC_KEYS / 'internimage_T_1000cls_keys.tsv').read_text().splitlines()]
    assert [(k, str(tuple(v.shape))) for k, v in got.items()] == [tuple(r) for r in rows]
    assert all(v.dtype in (torch.float32, torch.int64) for v in got.values())


def test_incomplete_or_missing_weights_are_refused(tmp_path):
    from pretrain.export import ExportError, consolidate

    root = tmp_path / 'run' / 'checkpoints'
    (root / 'step_00000004' / 'global_step4').mkdir(parents=True)
    with pytest.raises(ExportError, match=r'step_00000004 is not a complete checkpoint \(no COMPLETE'):
        consolidate(root / 'step_00000004')
    with pytest.raises(ExportError, match=f'{root}: no complete checkpoint'):
        consolidate(tmp_path / 'run')
    done = root / 'step_00000002'
    done.mkdir()
    (done / 'COMPLETE').write_text(json.dumps({'step': 2, 'world_size': 1, 'samples_seen': 8}))
    (done / 'config.yaml').write_text(json.dumps({'model': {'name': NAME, 'kwargs': KWARGS}}))
    with pytest.raises(ExportError, match=f'{done}: no ema weights'):
        consolidate(tmp_path / 'run', 'ema')  # the newest complete one, refused before anything is read
    # a ZeRO-3 EMA saved by 2 ranks, rank 1's partition lost
    torch.save({'shadow': {'w': torch.zeros(2)}, 'partitioned': {'w': True}, 'shapes': {'w': [4]}, 'num_updates': 1,
                'decay': 0.5, 'world_size': 2}, done / 'ema_00000.pt')
    with pytest.raises(ExportError, match=f'{done}: the ema weights are incomplete .*1 of 2 files missing: '
                                          'ema_00001.pt'):
        consolidate(done, 'ema')
    with pytest.raises(ExportError, match='neither a checkpoint'):
        consolidate(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# real DeepSpeed checkpoints


def _train_config(out_dir: str, urls: str, zero: int, m3i: bool) -> dict:
    cfg = {
        'model': {'name': NAME, 'num_classes': NUM_CLASSES, 'drop_path_rate': 0.0, 'kwargs': {**KWARGS, **OP}},
        'data': {'train': [{'name': 'in1k', 'urls': urls}], 'img_size': 32, 'num_workers': 0,
                 'auto_augment': None, 're_prob': 0.0},
        'optim': {'lr_base': 1e-2},
        'schedule': {'total_steps': STEPS, 'warmup_steps': 0, 'lr_scale_by_batch': False},
        # persistence threshold 1000: under ZeRO-3 small tensors stay gathered, larger ones are partitioned
        'deepspeed': {'zero_stage': zero, 'precision': 'fp32', 'micro_batch_size': MICRO,
                      'stage3_param_persistence_threshold': 1000},
        'ema': {'enabled': True, 'decay': 0.5},
        'checkpoint': {'interval_steps': 100, 'keep_last': 1},
        'logging': {'interval_steps': 1, 'tensorboard': False, 'progress': False},
        'run': {'output_dir': out_dir, 'seed': 0},
    }
    if m3i:  # the wrapper layout: contrastive (text tower) + MIM (teacher), no classifier (supervised weight 0)
        cfg['objective'] = {'kind': 'multi', 'supervised': {'weight': 0.0}, 'fcmae': {'weight': 0.0},
                            'contrastive': {'weight': 1.0, 'embed_dim': 32, 'text_width': 32, 'text_layers': 1,
                                            'text_heads': 2, 'context_length': 16},
                            'mim': {'weight': 1.0, 'decoder_dim': 16, 'teacher_decay': 0.5}}
        cfg['data'].update(img_size=64, train=[{'name': 'cc12m', 'urls': str(REAL_DATA / 'cc12m-train-0000.tar')},
                                               {'name': 'in1k', 'urls': urls}])
    return cfg


def _train_worker(out: str, urls: str, specs: list[str]) -> None:
    """For each ``name:zero[:m3i]``: train 2 steps, then rank 0 saves the weights and the weight averages (EMA, MIM
    teacher) the engine holds in memory."""
    import deepspeed

    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer

    rank = int(os.environ.get('RANK', 0))
    for spec in specs:
        name, zero, *kind = spec.split(':')
        trainer = Trainer(config_from_dict(_train_config(os.path.join(out, name), urls, int(zero), kind == ['m3i'])))
        trainer.train()
        module = trainer.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=int(zero) == 3):
            raw = {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}
        averages = {k: avg.full_state_dict() for k, avg in trainer.averages.items() if avg is not None}  # collective
        if rank == 0:
            torch.save({'raw': raw, **averages, 'step_dir': trainer.last_checkpoint},
                       os.path.join(out, name, 'reference.pt'))
        del trainer


def _references(out: Path, names: list[str]) -> dict:
    return {n: torch.load(out / n / 'reference.pt', weights_only=True) for n in names}


@pytest.fixture(scope='module')
def one_rank(shards, tmp_path_factory) -> dict:  # noqa: F811
    """ZeRO 0, 1 and 3 (the bare backbone) and an M3I stage under ZeRO-2, one after the other in one process."""
    out = tmp_path_factory.mktemp('export_one_rank')
    specs = ['z0:0', 'z1:1', 'z3:3', 'm3i:2:m3i']
    res = subprocess.run([sys.executable, THIS, 'train', str(out), shards, *specs], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return _references(out, [s.split(':')[0] for s in specs])


@pytest.fixture(scope='module')
def two_ranks(shards, tmp_path_factory) -> dict:  # noqa: F811
    """ZeRO-3 on 2 ranks (partitioned weights, EMA and teacher), the bare backbone and M3I."""
    out = tmp_path_factory.mktemp('export_two_ranks')
    specs = ['z3x2:3', 'm3ix2:3:m3i']
    run_procs(2, [THIS, 'train', str(out), shards, *specs], timeout=600)
    return _references(out, [s.split(':')[0] for s in specs])


def _check_run(ref: dict, tmp_path: Path, m3i: bool, world: int, load_raw: bool = False) -> None:
    """Every weight set consolidated from the checkpoint == what the engine held; every format of the averages (and
    of the raw weights with ``load_raw``; the fast test loads both from files) loads back to the same outputs."""
    from pretrain.export import consolidate

    raw_ref = strip_backbone(ref['raw']) if m3i else ref['raw']
    expected = {'raw': raw_ref, 'ema': with_int_buffers(strip_backbone(ref['ema']) if m3i else ref['ema'], raw_ref)}
    if m3i:
        expected['teacher'] = with_int_buffers(ref['teacher'], raw_ref)  # an EMA of the backbone itself
    num_classes = 0 if m3i else NUM_CLASSES  # M3I without the supervised objective: no classifier
    assert ('head.weight' in raw_ref) == (num_classes > 0)
    for weights, want in expected.items():
        sd, meta = consolidate(ref['step_dir'], weights)
        assert_same(sd, want, f'{weights} weights consolidated from {ref["step_dir"]}')
        assert (meta.step, meta.samples_seen, meta.world_size) == (STEPS, STEPS * MICRO * world, world)
        assert meta.num_classes == num_classes
        others = {k.split('.')[0] for k in ref['raw'] if not k.startswith('backbone.')} if m3i else set()
        assert {d.split('.')[0].split(' ')[0] for d in meta.dropped} == others
        if weights != 'raw' or load_raw:
            assert_formats_load(write_all(sd, meta, tmp_path / weights), want, meta, weights, num_classes)
        # each average really is another set of weights
        assert weights == 'raw' or any(not torch.equal(raw_ref[k], want[k]) for k in raw_ref)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['z0', 'z1', 'z3', 'm3i'])
def test_one_rank_checkpoints_export_every_format(one_rank, name, tmp_path):
    _check_run(one_rank[name], tmp_path, m3i=name == 'm3i', world=1)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize('name', ['z3x2', 'm3ix2'])
def test_two_rank_zero3_checkpoints_export_every_format(two_ranks, name, tmp_path):
    _check_run(two_ranks[name], tmp_path, m3i=name == 'm3ix2', world=2, load_raw=name == 'z3x2')


@pytest.mark.slow
def test_cli_writes_all_formats_from_a_run_folder(one_rank, tmp_path, capsys):
    step_dir = Path(one_rank['z1']['step_dir'])
    run_dir = step_dir.parent.parent
    cmd = [sys.executable, '-m', 'pretrain', 'export', str(run_dir), '--format', 'all', '--out', str(tmp_path),
           '--ema']
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stem = f'{NAME}_step{STEPS}_ema'
    for name in (f'{stem}.pth', f'{stem}_timm', f'{stem}.safetensors', f'{stem}_backbone.pth'):
        assert (tmp_path / name).exists(), name
        assert f'{tmp_path / name}' in res.stdout, res.stdout
    assert f'source: {step_dir} (step {STEPS}, samples seen {STEPS * MICRO}, ZeRO 1, ranks 1)' in res.stdout
    assert 'kept patch_embed.* (8), levels.* (' in res.stdout and 'dropped conv_head.* (6), head.* (2)' in res.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')], 'temporary files left behind'
    # refusals name the folder and exit 2
    from pretrain.export import main
    assert main([str(run_dir), '--format', 'official', '--out', str(tmp_path / 'x.pth'), '--teacher']) == 2
    assert f'{step_dir}: no teacher weights' in capsys.readouterr().err
    assert not (tmp_path / 'x.pth').exists()


@pytest.mark.slow
def test_cascade_init_weights_come_from_export(one_rank, tmp_path):
    """launch's init_from file is the export's consolidation: rank 0 writes it once, other ranks wait for it."""
    from launch.worker import ensure_init_weights

    ref = one_rank['z3']
    out_dir = Path(ref['step_dir']).parent.parent
    dest = ensure_init_weights(out_dir, tmp_path / 'init', rank=0)
    assert dest.name == f'{out_dir.parent.name}_step_{STEPS:08d}.pt'
    saved = torch.load(dest, map_location='cpu', weights_only=True)
    assert_same(saved['model'], ref['raw'], 'init weights')
    assert saved['meta']['step'] == STEPS and saved['meta']['weights'] == 'raw'
    assert ensure_init_weights(out_dir, tmp_path / 'init', rank=1) == dest  # present: no wait
    ema = ensure_init_weights(out_dir, tmp_path / 'init', rank=0, weights='ema')
    assert ema != dest
    assert_same(torch.load(ema, weights_only=True)['model'], with_int_buffers(ref['ema'], ref['raw']), 'ema init')
    with pytest.raises(TimeoutError):
        ensure_init_weights(out_dir, tmp_path / 'elsewhere', rank=1, timeout_s=1)


if __name__ == '__main__':
    if sys.argv[1] == 'train':
        _train_worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    from tests.dist_helpers import leave_worker
    leave_worker()
