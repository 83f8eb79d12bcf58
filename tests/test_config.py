"""The typed config: YAML + overrides, and every kind of bad value failing early with the file and key named."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config
from pretrain.engine.ds_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / 'configs' / 'stage' / 'supervised_tiny.yaml'

MINIMAL = """
data:
  train: [{name: a, urls: "/x/a-{000000..000003}.tar"}]
schedule:
  total_steps: 100
  warmup_steps: 10
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / 'run.yaml'
    p.write_text(text)
    return p


def test_shipped_tiny_config_loads():
    cfg = load_config(TINY)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.kwargs['depths'] == [1, 1, 2, 1]
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.precision == 'bf16'


def test_overrides_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ['deepspeed.zero_stage=3', 'optim.betas=[0.9, 0.95]',
                                                 'model.kwargs.channels=32', 'ema.enabled=true',
                                                 'optim.lr_base=1e-3', 'data.train=[{name: b, urls: /y.tar}]'])
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.kwargs == {'channels': 32}
    assert cfg.ema.enabled is True
    assert cfg.optim.lr_base == 1e-3 and isinstance(cfg.optim.lr_base, float)
    assert cfg.data.train[0].urls == '/y.tar'
    # round trip through plain dicts
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize('text, key', [
    (MINIMAL + 'deepspeed: {zero_stag: 2}\n', 'deepspeed.zero_stag'),
    (MINIMAL + 'bogus: 1\n', 'bogus'),
    (MINIMAL.replace('name: a', 'name: a, url2: 1'), 'data.train[0]'),
])
def test_unknown_key_in_file_names_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and key.split('[')[0] in str(e.value) and 'unknown key' in str(e.value)


@pytest.mark.parametrize('text, key', [
    (MINIMAL + 'deepspeed: {zero_stage: two}\n', 'deepspeed.zero_stage'),
    (MINIMAL + 'deepspeed: {micro_batch_size: 8.5}\n', 'deepspeed.micro_batch_size'),
    (MINIMAL + 'ema: {enabled: "yes"}\n', 'ema.enabled'),
    (MINIMAL + 'deepspeed: {precision: fp8}\n', 'deepspeed.precision'),
    (MINIMAL + 'optim: {betas: [0.9]}\n', 'optim.betas'),
])
def test_wrong_type_names_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and key in str(e.value)


@pytest.mark.parametrize('override, key', [
    ('deepspeed.offload_param=cpu', 'deepspeed.offload_param'),  # needs stage 3
    ('deepspeed.zero_stage=4', 'deepspeed.zero_stage'),
    ('schedule.warmup_steps=100', 'schedule.warmup_steps'),  # nothing left after warmup
    ('schedule.epochs=3', 'schedule.epochs'),  # both epochs and total_steps
    ('optim.layer_decay=1.5', 'optim.layer_decay'),
    ('checkpoint.keep_last=0', 'checkpoint.keep_last'),
    ('deepspeed.extra={bf16: {enabled: true}}', 'deepspeed.extra.bf16'),
    ('data.img_size=100', 'data.img_size'),
    ('data.ratio=[1.5,1.0]', 'data.ratio'),
    ('data.ratio=[0,1]', 'data.ratio'),
    ('data.ratio=[1,.inf]', 'data.ratio'),
    ('run.watchdog_min=10', 'run.watchdog_min'),  # not below collective_timeout_min (10): no stuck-rank dump
])
def test_impossible_combinations_fail(tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), [override])
    assert key in str(e.value)


def test_crop_ratio_reaches_the_training_transform(tmp_path, monkeypatch):
    from PIL import Image

    from data_pipelines import transforms
    from pretrain.engine.data import train_transform
    from tests.data_helpers import encode
    boxes = []
    real = transforms.rrc_params

    def recording(height, width, scale, ratio):  # what the transform's byte path samples its crop boxes with
        box = real(height, width, scale, ratio)
        boxes.append((tuple(ratio), box))
        return box

    monkeypatch.setattr(transforms, 'rrc_params', recording)
    png = encode(Image.new('L', (28, 28)), 'PNG')
    config = write(tmp_path, MINIMAL)
    tensor_route = ['data.color_jitter=null', 'data.auto_augment=null', 'data.re_prob=0']  # no PIL-level step
    default = train_transform(load_config(config, tensor_route))
    square = train_transform(load_config(config, [*tensor_route, 'data.ratio=[1,1]', 'data.scale_min=0.5']))
    # With RandAugment / colour jitter the crop is timm's, on PIL images: it gets the same range.
    assert train_transform(load_config(config, ['data.ratio=[1,1]'])).crop.ratio == (1.0, 1.0)
    assert default.from_encoded(png).shape == (3, 224, 224)
    assert boxes[-1][0] == pytest.approx((3 / 4, 4 / 3))
    boxes.clear()
    for _ in range(50):
        assert square.from_encoded(png).shape == (3, 224, 224)
    assert {ratio for ratio, _ in boxes} == {(1.0, 1.0)}
    assert all(h == w for _, (_, _, h, w) in boxes) and len({h for _, (_, _, h, _) in boxes}) > 1


def test_the_watchdog_fires_before_the_collective_timeout_or_is_off(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r'run\.watchdog_min.*below run\.collective_timeout_min \(0\.5\)'):
        load_config(path, ['run.collective_timeout_min=0.5', 'run.watchdog_min=0.5'])
    assert load_config(path, ['run.collective_timeout_min=0.5', 'run.watchdog_min=0.4']).run.watchdog_min == 0.4
    assert load_config(path, ['run.collective_timeout_min=0.5', 'run.watchdog_min=0']).run.watchdog_min == 0


def test_snip_needs_the_supervised_objective(tmp_path):
    multi = ['objective.kind=multi', 'objective.supervised.weight=1', 'objective.contrastive.weight=0',
             'objective.mim.weight=0', 'objective.fcmae.weight=0']
    with pytest.raises(ConfigError, match=r'sparsity\.init.*objective\.kind=supervised'):
        load_config(write(tmp_path, MINIMAL), ['sparsity.enabled=true', 'sparsity.init=snip'] + multi)
    cfg = load_config(write(tmp_path, MINIMAL), ['sparsity.enabled=true', 'sparsity.init=snip'])
    assert cfg.sparsity.init == 'snip'


def test_mixup_needs_even_micro_batch(tmp_path):
    with pytest.raises(ConfigError, match='deepspeed.micro_batch_size'):
        load_config(write(tmp_path, MINIMAL), ['loss.mixup_alpha=0.8', 'deepspeed.micro_batch_size=7'])


def test_unknown_override_key_and_bad_syntax(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r'command line: optim\.lr_peak: unknown key'):
        load_config(path, ['optim.lr_peak=1'])
    with pytest.raises(ConfigError, match='key.sub=value'):
        load_config(path, ['optim.lr_base'])
    with pytest.raises(ConfigError, match=r'optim\.lr_base.*expected a number'):
        load_config(path, ['optim.lr_base=fast'])


def test_file_errors_reported_before_overrides_could_hide_them(tmp_path):
    path = write(tmp_path, MINIMAL + 'deepspeed: {zero_stage: x}\n')
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, ['deepspeed.zero_stage=2'])


def test_deepspeed_config_from_ours(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ['deepspeed.zero_stage=3', 'deepspeed.offload_param=cpu',
                                                 'deepspeed.offload_optimizer=cpu', 'deepspeed.micro_batch_size=16',
                                                 'deepspeed.grad_accum_steps=4', 'deepspeed.precision=bf16'])
    ds = build_deepspeed_config(cfg, world_size=8, lr_peak=4e-3)
    assert ds['train_batch_size'] == 16 * 4 * 8
    assert ds['zero_optimization']['stage'] == 3
    assert ds['zero_optimization']['offload_param']['device'] == 'cpu'
    assert ds['zero_optimization']['offload_optimizer']['device'] == 'cpu'
    assert ds['bf16']['enabled'] and not ds['fp16']['enabled']
    assert ds['optimizer']['params']['torch_adam'] is False  # offload runs DeepSpeedCPUAdam
    assert ds['gradient_clipping'] == 5.0
    # DeepSpeed's own parser accepts it (without a process group it assumes one rank)
    from deepspeed.runtime.config import DeepSpeedConfig
    parsed = DeepSpeedConfig(build_deepspeed_config(cfg, world_size=1, lr_peak=4e-3))
    assert parsed.zero_optimization_stage == 3 and parsed.gradient_accumulation_steps == 4
    assert parsed.train_batch_size == 64 and parsed.bfloat16_config.enabled


def test_cli_rejects_bad_config_before_work(tmp_path):
    import subprocess
    import sys
    path = write(tmp_path, MINIMAL + 'deepspeed: {zero_stage: 7}\n')
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'train', str(path)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert 'deepspeed.zero_stage' in res.stderr and str(path) in res.stderr


def test_every_shipped_stage_config_loads():
    """Each configs/stage/*.yaml passes the schema and its cross-field checks as shipped."""
    stages = sorted((REPO / 'configs' / 'stage').glob('*.yaml'))
    assert len(stages) >= 8
    for path in stages:
        cfg = load_config(path)
        assert cfg.data.train, path


MULTI = MINIMAL + """
loss: {mixup_alpha: 0.0, cutmix_alpha: 0.0}
objective:
  kind: multi
  supervised: {weight: 0.0}
  contrastive: {weight: 0.0}
  mim: {weight: 0.0}
  fcmae: {weight: 1.0}
"""


def test_multi_objective_stage_states_every_weight(tmp_path):
    cfg = load_config(write(tmp_path, MULTI))
    assert cfg.objective.weights() == {'supervised': 0.0, 'contrastive': 0.0, 'mim': 0.0, 'fcmae': 1.0}
    # A part left out would train (supervised used to default to 1.0): refused with the file and the key.
    path = write(tmp_path, MULTI.replace('  supervised: {weight: 0.0}\n', ''))
    with pytest.raises(ConfigError, match=rf'{path}: objective.supervised.weight: objective.kind=multi needs every'):
        load_config(path)
    with pytest.raises(ConfigError, match='objective.mim.weight: objective.kind=multi needs every'):
        load_config(path, ['objective.supervised.weight=0', 'objective.mim.weight=null'])


def test_supervised_stage_refuses_weighted_parts(tmp_path):
    with pytest.raises(ConfigError, match='objective.contrastive.weight: 1.0 under objective.kind=supervised'):
        load_config(write(tmp_path, MINIMAL), ['objective.contrastive.weight=1.0'])
    assert load_config(write(tmp_path, MINIMAL), ['objective.supervised.weight=1.0']).objective.kind == 'supervised'


def test_m3i_is_an_alias_of_multi(tmp_path):
    assert load_config(write(tmp_path, MULTI.replace('kind: multi', 'kind: m3i'))).objective.kind == 'multi'
    assert load_config(write(tmp_path, MULTI.replace('kind: multi', 'kind: supervised')),
                       ['objective.kind=m3i']).objective.kind == 'multi'
    with pytest.raises(ConfigError, match="objective.kind: must be one of \\['supervised', 'multi'\\]"):
        load_config(write(tmp_path, MULTI.replace('kind: multi', 'kind: mae')))


def test_old_weight_import_keys_load_with_a_warning(tmp_path):
    old = write(tmp_path, MINIMAL + 'model: {checkpoint_path: /w/init.pth, checkpoint_use_ema: true}\n')
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(old)
    assert sorted(str(w.message) for w in caught) == [
        f'{old}: model.checkpoint_path is deprecated, use model.init_from',
        f'{old}: model.checkpoint_use_ema is deprecated, use model.init_from_ema']
    assert (cfg.model.init_from, cfg.model.init_from_ema) == ('/w/init.pth', True)
    with pytest.warns(FutureWarning, match='command line: model.checkpoint_path is deprecated'):
        cfg = load_config(write(tmp_path, MINIMAL), ['model.checkpoint_path=/w/b.pth'])
    assert cfg.model.init_from == '/w/b.pth'
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match='model.checkpoint_path: given together with '
                                                                      'model.init_from'):
        config_from_dict({'model': {'checkpoint_path': '/a', 'init_from': '/b'}})
