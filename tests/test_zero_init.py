"""``deepspeed.zero_init``: the model built partitioned (deepspeed.zero.Init) trains exactly like the model built
whole and partitioned by DeepSpeed, on 2 CPU ranks under ZeRO-3 in bf16.

The worker (this file's ``__main__`` under torchrun) builds a Trainer with ``zero_init`` off and on for one case,
gathers the initial parameters and buffers, trains 3 steps on fixed batches and gathers the final weights. Cases:
InternImage loading an initial checkpoint (``model.init_from``), ConvNeXt V2 (timm initialises its weights
with ``named_apply`` from the parent, which plain ``zero.Init`` skips), M3I (open_clip's text tower, whose
``init_parameters`` also runs from the parent, plus the MIM decoder and teacher), PeLK (a parameter shared by
several modules) and InternImage with parameter offload (the partitions live in host memory).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.test_engine import TINY_MODEL, run_procs

STEPS, MB = 3, 4
M3I_OBJECTIVE = {'kind': 'multi', 'supervised': {'weight': 0.5}, 'fcmae': {'weight': 0.0},
                 'contrastive': {'weight': 1.0, 'embed_dim': 32, 'text_width': 32, 'text_layers': 1,
                                 'text_heads': 2, 'context_length': 16},
                 'mim': {'weight': 1.0, 'decoder_dim': 16, 'teacher_decay': 0.9}}
CASES = {
    'internimage': {'model': TINY_MODEL},  # + init_from, written by the worker
    'convnextv2': {'model': {'name': 'convnextv2_atto', 'num_classes': 200, 'drop_path_rate': 0.0,
                             'kwargs': {'dims': [16, 32, 64, 128], 'depths': [1, 1, 1, 1]}}},
    'm3i': {'model': TINY_MODEL, 'objective': M3I_OBJECTIVE},
    'offload_param': {'model': TINY_MODEL, 'deepspeed': {'offload_param': 'cpu'}},  # partitions in host memory
    'pelk': {'model': {'name': 'pelk_t', 'num_classes': 200, 'drop_path_rate': 0.0,  # KPE shared by a stage's blocks
                       'kwargs': {'dims': [16, 32, 64, 128], 'depths': [1, 1, 2, 1]}}},
}


def _config(case: str, out_dir: str, zero_init: bool, checkpoint: str | None):
    from pretrain.config import config_from_dict

    spec = CASES[case]
    model = dict(spec['model'])
    if checkpoint:
        model['init_from'] = checkpoint
    return config_from_dict({
        'model': model,
        'objective': spec.get('objective', {'kind': 'supervised'}),
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
        'loss': {'label_smoothing': 0.1},
        'optim': {'lr_base': 2e-3, 'layer_decay': 0.9},
        'schedule': {'total_steps': STEPS, 'warmup_steps': 1, 'lr_scale_by_batch': False},
        'deepspeed': {'zero_stage': 3, 'precision': 'bf16', 'micro_batch_size': MB, 'zero_init': zero_init,
                      'stage3_param_persistence_threshold': 1000, **spec.get('deepspeed', {})},
        'ema': {'enabled': True, 'decay': 0.5},
        'checkpoint': {'resume': 'none'},
        'logging': {'tensorboard': False, 'progress': False},
        'run': {'output_dir': os.path.join(out_dir, f'run_{case}_{int(zero_init)}'), 'seed': 0},
    })


def _gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        out = {n: p.detach().clone() for n, p in module.named_parameters()}
    out.update({f'buffer:{n}': b.detach().clone() for n, b in module.named_buffers()})
    return out


def _worker(out_dir: str, case: str) -> None:
    import deepspeed

    from pretrain.common import dist as edist
    from pretrain.engine.trainer import Trainer, build_model

    env = edist.init_distributed()
    rank, world = env.rank, env.world_size
    checkpoint, result = None, {}
    if case == 'internimage':  # an initial checkpoint unlike the seeded weights, in the official key layout
        checkpoint = os.path.join(out_dir, 'init.pth')
        if rank == 0:
            torch.manual_seed(99)
            model = build_model(_config(case, out_dir, False, None))
            torch.save({'model': model.state_dict()}, checkpoint)
            result['checkpoint'] = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        edist.barrier()
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(STEPS, MB * world, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 200, (STEPS, MB * world), generator=gen)
    text = torch.randint(1, 1000, (STEPS, MB * world, 16), generator=gen)
    for zero_init in (False, True):
        trainer = Trainer(_config(case, out_dir, zero_init, checkpoint), build_data=False)
        initial = _gathered(trainer.engine.module)
        losses = []
        for s in range(STEPS):
            lo = rank * MB
            batch = {'image': images[s, lo:lo + MB], 'label': labels[s, lo:lo + MB], 'key': [''] * MB,
                     'text': text[s, lo:lo + MB], 'has_text': torch.arange(MB) % 2 == 0}
            losses.append(trainer.train_step(lambda b=batch: b).loss)
        result[zero_init] = {'initial': initial, 'final': _gathered(trainer.engine.module), 'losses': losses,
                             'ema': trainer.ema.full_state_dict()}
        del trainer
    if case == 'convnextv2':  # plain zero.Init, without copying a reference in: what the copy is there for
        cfg = _config(case, out_dir, True, None)
        from pretrain.engine.ds_config import build_deepspeed_config
        torch.manual_seed(cfg.run.seed)
        with deepspeed.zero.Init(config_dict_or_path=build_deepspeed_config(cfg, world_size=world, lr_peak=1e-3)):
            naive = build_model(cfg)
        result['naive_initial'] = _gathered(naive)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f'{case}.pt'))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize('case', list(CASES))
def test_zero_init_trains_like_a_whole_build(case, tmp_path):
    """Bitwise: the initial parameters and buffers, 3 steps of losses, the final weights and the EMA."""
    run_procs(2, [str(Path(__file__).resolve()), str(tmp_path), case], timeout=600)
    res = torch.load(tmp_path / f'{case}.pt')
    whole, partitioned = res[False], res[True]
    for what in ('initial', 'final', 'ema'):
        assert whole[what].keys() == partitioned[what].keys(), what
        differ = [k for k in whole[what] if not torch.equal(whole[what][k], partitioned[what][k])]
        assert not differ, f'{case}: {what}: {len(differ)} tensors differ, e.g. {differ[:4]}'
    assert whole['losses'] == partitioned['losses']
    assert all(torch.isfinite(torch.tensor(whole['losses']))) and whole['losses'][0] != whole['losses'][-1]
    if case == 'internimage':  # both started from the initial checkpoint, not from the seeded weights
        ckpt, params = res['checkpoint'], [k for k in whole['initial'] if not k.startswith('buffer:')]
        assert all(torch.equal(whole['initial'][k], ckpt[k].to(torch.bfloat16)) for k in params)
    if case == 'convnextv2':  # without the reference copy, timm's parent-level init is lost under zero.Init:
        naive = res['naive_initial']  # it zeroes the biases, which keep nn.Conv2d's own uniform init instead
        assert not whole['initial']['stem.0.bias'].any() and naive['stem.0.bias'].any()


def test_zero_init_needs_zero3():
    from pretrain.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match='deepspeed.zero_init: .*needs zero_stage 3, got stage 2'):
        config_from_dict({'model': TINY_MODEL, 'data': {'train': [{'name': 'x', 'urls': 'x.tar'}]},
                          'deepspeed': {'zero_stage': 2, 'zero_init': True}})


def test_plan_reports_the_build_host_memory():
    from pretrain.config import config_from_dict
    from pretrain.engine.plan import GiB, plan

    def build_gib(**ds):
        cfg = config_from_dict({'model': TINY_MODEL, 'data': {'train': [{'name': 'x', 'urls': 'x.tar'}],
                                                              'img_size': 32},
                                'schedule': {'total_steps': 10}, 'deepspeed': {'zero_stage': 3, **ds}})
        out = plan(cfg, world_size=4, gpu_mem_gib=80)
        return out['build_host_gib'], out['params']

    whole, params = build_gib()
    assert whole == {'rank0': 4 * params / GiB, 'other_ranks': 4 * params / GiB}
    assert build_gib(zero_init=True)[0] == {'rank0': 4 * params / GiB, 'other_ranks': 0.0}
    offloaded = build_gib(zero_init=True, offload_param='cpu')[0]['other_ranks']
    assert offloaded == pytest.approx(2 * params / 4 / GiB)  # the bf16 partition, in host memory


if __name__ == '__main__':
    _worker(sys.argv[1], sys.argv[2])
    from tests.dist_helpers import leave_worker
    leave_worker()
