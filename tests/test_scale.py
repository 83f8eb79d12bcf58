"""``python -m pretrain scale``: phi = 0 is InternImage-T exactly, the stacking and rounding rules hold at every phi,
a parameter target is met by its nearest rounded model, and the printed kwargs build through a stage config."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from pretrain.models import INTERNIMAGE_ARGS
from pretrain.scale import ALPHA, BETA, _count, arch_kwargs, fit_phi, official_position, scaled_arch
from tests.test_engine import REPO, _env

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def test_phi_zero_is_internimage_t_exactly():
    kwargs = arch_kwargs(scaled_arch(0.0))
    t = INTERNIMAGE_ARGS['internimage_t']
    assert kwargs == dict(channels=t['channels'], depths=list(t['depths']), groups=list(t['groups']))
    assert _count(kwargs, macs=False)[0] == 29_918_424  # the official InternImage-T count (docs/MODELS.md)


@pytest.mark.parametrize('phi', [-1.0, 0.3, 0.75, 1.0, 1.77, 2.5, 3.5, 5.3, 7.0])
def test_stacking_and_rounding_rules(phi):
    arch = scaled_arch(phi)
    c1, cp, l1, l3 = arch['C1'], arch['C_prime'], arch['L1'], arch['L3']
    kwargs = arch_kwargs(arch)
    assert c1 % cp == 0 and c1 >= cp  # every G_i = 2^(i-1) C1 / C' is a whole number
    assert kwargs['groups'] == [c1 * 2 ** i // cp for i in range(4)]
    assert all(c1 * 2 ** i == g * cp for i, g in enumerate(kwargs['groups']))
    d = kwargs['depths']
    assert d[0] == d[1] == d[3] == l1 and 1 <= l1 <= l3 == d[2]
    assert abs(3 * l1 + l3 - 30 * ALPHA ** phi) <= 0.5 + (1 if l3 == l1 else 0)  # D rounded to the nearest integer
    assert abs(c1 - 64 * BETA ** phi) <= cp / 2 or c1 == cp  # C1 to the nearest multiple of C'
    assert abs(l1 - (3 * l1 + l3) * 4 / 30) <= 0.5 or l1 == 1  # T's split of the depth


def test_c_prime_32_keeps_group_width():
    kwargs = arch_kwargs(scaled_arch(5.3, c_prime=32))
    assert all(c * 2 ** i // g == 32 for i, (c, g) in enumerate(zip([kwargs['channels']] * 4, kwargs['groups'])))


@pytest.mark.slow
def test_parameter_target_gives_the_nearest_rounded_model():
    target = 1.0e8
    phi = fit_phi(target)
    got = _count(arch_kwargs(scaled_arch(phi)), macs=False)[0]
    for other in (phi - 0.15, phi + 0.15):  # models on either side are farther from the target
        arch = scaled_arch(other)
        if arch != scaled_arch(phi):
            assert abs(_count(arch_kwargs(arch), macs=False)[0] - target) >= abs(got - target)
    assert abs(got - target) / target < 0.1


def test_official_sizes_against_the_curve():
    s = official_position(80, [4, 4, 21, 4])
    assert s['phi_width'] == pytest.approx(math.log(80 / 64) / math.log(BETA))
    assert s['phi_depth'] == pytest.approx(math.log(33 / 30) / math.log(ALPHA))
    assert min(s['phi_depth'], s['phi_width']) <= s['phi'] <= max(s['phi_depth'], s['phi_width'])
    assert official_position(64, [4, 4, 18, 4]) == pytest.approx(
        dict(phi_depth=0, phi_width=0, phi=0, depth_vs_rule=0, width_vs_rule=0), abs=1e-12)


@pytest.mark.slow
def test_cli_kwargs_build_through_a_stage_config():
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'scale', '--phi', '1', '--json'], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    from pretrain.config import config_from_dict
    from pretrain.models import backbone_from_config

    cfg = config_from_dict({'model': {'name': 'internimage_t', 'kwargs': info['kwargs']},
                            'data': {'train': [{'name': 'x', 'urls': 'x.tar'}]},
                            'schedule': {'total_steps': 10, 'warmup_steps': 0}})
    with torch.device('meta'):
        model = backbone_from_config(cfg.model, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == info['params']
    assert [len(level.blocks) for level in model.levels] == info['kwargs']['depths']
    assert info['gmacs_224'] > 4.89 and info['model_states_gib_per_rank'] > 0
