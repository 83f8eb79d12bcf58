"""Dynamic sparsity (SLaK prune and grow): the pieces on their own, and the callback on a real DeepSpeed engine for
ZeRO 0-3 in bf16 (and ZeRO-0/2 in fp32) on 2 CPU ranks."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from pretrain.engine.sparsity import SparsityConfig, layer_densities, prune_and_grow, prune_rate_at
from tests.test_engine import run_procs, shards  # noqa: F401  (shards: real photos as tmp shards)

# dims 14 -> 5 peripheral channels: 5 x 169 = 845 elements, which 2 ranks do not divide (ZeRO-3 padding)
TINY_PELK = {'name': 'pelk_t', 'num_classes': 10, 'drop_path_rate': 0.0,
             'kwargs': {'dims': [14, 28, 56, 112], 'depths': [1, 1, 1, 1]}}
SETUPS = [(0, 'fp32'), (0, 'bf16'), (1, 'bf16'), (2, 'bf16'), (2, 'fp32'), (3, 'bf16')]


def test_layer_densities_average_to_the_target():
    shapes = {'conv': (64, 1, 13, 13), 'fc1': (256, 64), 'fc2': (64, 256), 'stem': (16, 3, 4, 4), 'tiny': (2, 2)}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    for init in ('uniform', 'erk'):
        d = layer_densities(shapes, 0.6, init)
        assert sum(d[n] * numel[n] for n in shapes) / sum(numel.values()) == pytest.approx(0.6)
        assert all(0 < v <= 1 for v in d.values())
    erk = layer_densities(shapes, 0.6, 'erk')
    assert erk['tiny'] == 1.0  # would exceed 1: dense
    assert erk['fc1'] / erk['conv'] == pytest.approx((320 / (256 * 64)) / (91 / (64 * 169)))  # sum / prod of dims
    assert set(layer_densities(shapes, 0.6, 'uniform').values()) == {0.6}


def test_prune_rate_decays_by_cosine():
    cfg = SparsityConfig(prune_rate=0.3, prune_rate_min=0.005)
    assert prune_rate_at(cfg, 0, 1000) == pytest.approx(0.3)
    assert prune_rate_at(cfg, 500, 1000) == pytest.approx((0.3 + 0.005) / 2)
    assert prune_rate_at(cfg, 1000, 1000) == pytest.approx(0.005)
    for bad in (dict(sparsity=1.0), dict(init='grasp'), dict(update_interval_steps=0), dict(prune_rate_min=0.5)):
        with pytest.raises(ValueError):
            SparsityConfig(**bad).validate()


def test_prune_and_grow_drops_the_smallest_and_keeps_the_count():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(40, 30, generator=gen) < 0.6
    weight = torch.randn(40, 30, generator=gen) * mask
    new = prune_and_grow(mask, weight, 0.25, torch.Generator().manual_seed(1))
    active = int(mask.sum())
    k = round(0.25 * active)
    # the k active weights of smallest magnitude (distinct magnitudes: a unique set)
    threshold = weight[mask].abs().sort().values[k - 1]
    dropped = mask & (weight.abs() <= threshold)
    assert int(dropped.sum()) == k
    kept = mask & ~dropped
    assert torch.equal(new & kept, kept)  # every other active weight stays
    grown = new & ~kept
    assert int(grown.sum()) == k and not (grown & kept).any()  # k regrown among the inactive (+ just dropped)
    assert int(new.sum()) == active
    assert int((grown & ~mask).sum()) > 0  # some really were inactive before
    again = prune_and_grow(mask, weight, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(new, again)  # same generator, same masks (every rank decides alike)
    assert torch.equal(prune_and_grow(mask, weight, 0.0, gen), mask)


# ------------------------------------------------------------------------------------------------ DeepSpeed
def _worker(out_dir: str) -> None:
    """For each (ZeRO stage, precision): 5 steps of a tiny PeLK with prune and grow every 2 steps; rank 0 writes what
    the checks found. Then 3 steps without the callback under ZeRO-0 and ZeRO-3 (fp32), weights saved for parity."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    from pretrain.config import config_from_dict
    from pretrain.engine.sparsity import DynamicSparsity
    from pretrain.engine.trainer import Trainer

    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    gen = torch.Generator().manual_seed(0)
    steps, mb = 5, 4
    images = torch.randn(steps, world * mb, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (steps, world * mb), generator=gen)
    results = {}

    def make_trainer(stage, precision, name, ema=False):
        return Trainer(config_from_dict({
            'model': TINY_PELK,
            'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
            'optim': {'lr_base': 5e-3},
            'schedule': {'total_steps': 20, 'warmup_steps': 0, 'lr_scale_by_batch': False},
            'deepspeed': {'zero_stage': stage, 'precision': precision, 'micro_batch_size': mb,
                          'stage3_param_persistence_threshold': 100},
            'ema': {'enabled': ema, 'decay': 0.5, 'warmup': False},
            'checkpoint': {'resume': 'none'},
            'logging': {'tensorboard': False, 'progress': False},
            'run': {'output_dir': os.path.join(out_dir, name), 'seed': 0},
        }), build_data=False)

    def batch(s):
        return {'image': images[s, rank * mb:(rank + 1) * mb], 'label': labels[s, rank * mb:(rank + 1) * mb],
                'key': [''] * mb}

    for stage, precision in SETUPS:
        trainer = make_trainer(stage, precision, f'run_{stage}_{precision}', ema=True)
        sparse = DynamicSparsity(SparsityConfig(enabled=True, sparsity=0.4, update_interval_steps=2, prune_rate=0.3),
                                 trainer)
        trainer.callbacks.append(sparse)
        params = sparse.params
        optimizer = trainer.engine.optimizer
        counts = {n: int(m.sum()) for n, m in sparse.masks.items()}
        found = {'masked_nonzero_fp32': 0, 'masked_nonzero_module': 0, 'regrown_moment_nonzero': 0, 'regrown': 0,
                 'count_changes': 0, 'rank_disagreements': 0, 'ema_saw_unmasked': 0, 'steps_with_new_masks': [],
                 'losses': [],
                 'density': sparse.density(), 'branch': _branch(next(iter(params.values())), optimizer)}

        for s in range(steps):
            before = {n: m.clone() for n, m in sparse.masks.items()}
            ema_before = trainer.ema.full_state_dict()
            res = trainer.train_step(lambda s=s: batch(s))
            ema_after = trainer.ema.full_state_dict()
            for n, m in sparse.masks.items():  # the EMA averaged the masked weights (0): it halved there (decay 0.5)
                found['ema_saw_unmasked'] += int((ema_after[n].view(m.shape)[~m]
                                                  != 0.5 * ema_before[n].view(m.shape)[~m]).sum())
            found['losses'].append(res.loss)
            fp32, module = _snapshot(params, stage, optimizer)
            for n, m in sparse.masks.items():
                found['masked_nonzero_fp32'] += int((fp32[n].view(m.shape)[~m] != 0).sum())
                found['masked_nonzero_module'] += int((module[n].view(m.shape)[~m] != 0).sum())
                found['count_changes'] += int(int(m.sum()) != counts[n])
            if any(not torch.equal(before[n], m) for n, m in sparse.masks.items()):
                found['steps_with_new_masks'].append(trainer.state.step)
                for n, p in params.items():
                    grown = (sparse.masks[n] & ~before[n]).reshape(-1)
                    found['regrown'] += int(grown.sum())
                    for key in ('exp_avg', 'exp_avg_sq'):
                        state = (safe_get_full_optimizer_state(p, key) if _branch(p) != 'plain'
                                 else _zero0_copies(trainer.engine.optimizer, p)[1][key])
                        found['regrown_moment_nonzero'] += int((state.reshape(-1)[grown] != 0).sum())
            digest = sum(int(m.reshape(-1).nonzero().sum()) for m in sparse.masks.values())
            everyone = [None] * world
            dist.all_gather_object(everyone, digest)
            found['rank_disagreements'] += int(len(set(everyone)) != 1)
        restored = DynamicSparsity(sparse.cfg, trainer, draw=False)  # as in a resume: the saved masks only
        restored.load_state_dict(sparse.state_dict())
        found['restored_equal'] = all(torch.equal(restored.masks[n], m) for n, m in sparse.masks.items())
        found['updates'] = restored.updates
        results[f'{stage}_{precision}'] = found
        del trainer
    # Without the callback: PeLK itself (one KPE shared by a stage's blocks) trains alike under ZeRO-0 and ZeRO-3.
    for stage in (0, 3):
        trainer = make_trainer(stage, 'fp32', f'parity_{stage}')
        for s in range(3):
            trainer.train_step(lambda s=s: batch(s))
        params = dict(trainer.engine.module.named_parameters())
        fp32, _ = _snapshot(params, stage, trainer.engine.optimizer)
        if rank == 0:
            torch.save({n: t.reshape(_full_shape(params[n])) for n, t in fp32.items()},
                       Path(out_dir, f'parity_{stage}.pt'))
        del trainer
    if rank == 0:
        Path(out_dir, 'results.json').write_text(json.dumps(results, indent=1))


def _snapshot(params: dict, stage: int, optimizer) -> tuple[dict, dict]:
    """Full fp32 master weights (read through DeepSpeed) and the module's own weights (gathered under ZeRO-3)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    fp32 = {n: (safe_get_full_fp32_param(p) if _branch(p) != 'plain' else _zero0_copies(optimizer, p)[0]).float()
            for n, p in params.items()}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        module = {n: p.detach().float().clone() for n, p in params.items()}
    return fp32, module


def _zero0_copies(optimizer, p) -> tuple[torch.Tensor, dict]:
    """ZeRO-0: (fp32 master, optimizer state) of p: p itself, or the copy DeepSpeed's unfused bf16 wrapper keeps."""
    if not hasattr(optimizer, 'fp32_groups'):
        return p.detach().clone(), optimizer.state[p]
    index = {id(q): (i, j) for i, group in enumerate(optimizer.fp16_groups) for j, q in enumerate(group)}
    i, j = index[id(p)]
    master = optimizer.fp32_groups[i][j]
    return master.detach().clone(), optimizer.optimizer.state[master]


def _full_shape(p) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, 'ds_shape') else tuple(p.shape)


def _branch(p, optimizer=None) -> str:
    if hasattr(p, 'ds_id'):
        return 'zero3'
    if hasattr(p, '_hp_mapping'):
        return 'hp_mapping'
    return 'unfused' if hasattr(optimizer, 'fp32_groups') else 'plain'


@pytest.mark.slow
@pytest.mark.dist
def test_callback_holds_masks_in_master_and_module_weights_for_every_zero_stage(tmp_path):
    """2 ranks: after every step the masked positions are exactly zero in the fp32 master weights (read back through
    DeepSpeed) and in the module's own weights; per-layer counts never change; prune and grow runs at steps 2 and 4,
    regrown positions have zero Adam moments; both ranks hold the same masks; the masks come back from the state;
    the EMA (decay 0.5) is updated after the masks are applied, so at masked positions it halves every step.
    Also: without the callback, the tiny PeLK's fp32 weights after 3 steps under ZeRO-3 equal ZeRO-0's."""
    run_procs(2, [str(Path(__file__).resolve()), str(tmp_path)], timeout=600)
    results = json.loads((tmp_path / 'results.json').read_text())
    assert set(results) == {f'{s}_{p}' for s, p in SETUPS}
    branches = {k: r['branch'] for k, r in results.items()}
    assert branches == {'0_fp32': 'plain', '0_bf16': 'unfused', '1_bf16': 'hp_mapping', '2_bf16': 'hp_mapping',
                        '2_fp32': 'hp_mapping', '3_bf16': 'zero3'}
    for key, r in results.items():
        assert r['density'] == pytest.approx(0.6, abs=1e-3), key
        assert r['steps_with_new_masks'] == [2, 4], key
        assert r['regrown'] > 0 and r['updates'] == 2, key
        for check in ('masked_nonzero_fp32', 'masked_nonzero_module', 'regrown_moment_nonzero', 'count_changes',
                      'rank_disagreements', 'ema_saw_unmasked'):
            assert r[check] == 0, f'{key}: {check} = {r[check]}'
        assert r['restored_equal'], key
        assert all(math.isfinite(v) for v in r['losses']) and r['losses'][0] != r['losses'][-1], key
    # PeLK under ZeRO-3 (partitioned; the KPE shared by a stage's blocks) == ZeRO-0, 3 fp32 steps on 2 ranks
    ref, got = torch.load(tmp_path / 'parity_0.pt'), torch.load(tmp_path / 'parity_3.pt')
    assert ref.keys() == got.keys() and 'stages.2.kpe' in ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=2e-5, msg=lambda m, n=n: f'{n}: {m}')


if __name__ == '__main__':
    _worker(sys.argv[1])
    from tests.dist_helpers import leave_worker
    leave_worker()


@pytest.mark.slow
def test_sparsity_through_the_config_resumes_exactly_from_a_checkpoint(shards, tmp_path):  # noqa: F811
    """`sparsity.enabled` in a stage config: the PeLK large kernels are masked at the configured sparsity from the
    first step, prune-and-grow runs every step, and 2 steps + resume + 2 steps give the weights of 4 steps straight
    (the masks travel in the checkpoint as its registered part ``sparsity``)."""
    from tests.test_engine import consolidated, stage_config

    common = dict(model={**TINY_PELK, 'num_classes': 200},
                  sparsity={'enabled': True, 'sparsity': 0.5, 'include': r'blocks\.\d+\.conv\.weight$',
                            'update_interval_steps': 1, 'prune_rate': 0.3},
                  schedule={'total_steps': 4, 'warmup_steps': 1}, checkpoint={'interval_steps': 2, 'keep_last': 5},
                  loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0}, data={'val': []})
    straight = stage_config(tmp_path / 'a.yaml', shards, tmp_path / 'a', **common)
    run_procs(1, ['-m', 'pretrain', 'train', str(straight)])
    split = stage_config(tmp_path / 'b.yaml', shards, tmp_path / 'b', **common)
    run_procs(1, ['-m', 'pretrain', 'train', str(split), 'run.stop_after_steps=2'])
    out = run_procs(1, ['-m', 'pretrain', 'train', str(split)])
    assert '(exact)' in out
    a = consolidated(str(tmp_path / 'a' / 'checkpoints' / 'step_00000004'), 4)
    b = consolidated(str(tmp_path / 'b' / 'checkpoints' / 'step_00000004'), 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trainer = torch.load(tmp_path / 'a' / 'checkpoints' / 'step_00000004' / 'trainer.pt', weights_only=False)
    masks = trainer['sparsity']['masks']
    assert masks and all(k.endswith('.conv.weight') and '.blocks.' in k for k in masks)
    assert sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == \
        pytest.approx(0.5, abs=0.02)
    for k, m in masks.items():  # every masked-off weight is zero (regrown ones may be zero too: they restart at 0)
        assert (a[k][~m.bool()] == 0).all(), k
