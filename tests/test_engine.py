"""The training engine: unit tests of its components, and 2-process CPU runs of real DeepSpeed (gloo) on real shards.

Multi-process tests launch ``torchrun --nproc_per_node 2`` in a subprocess: either the real CLI
(``python -m pretrain train``) or this file's ``__main__`` worker (ZeRO parity: fixed batches through the same
``Trainer.train_step``). The model is a tiny InternImage (channels 16, one block per stage) on 32 px images.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.common.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {'name': 'internimage_t', 'num_classes': 200, 'drop_path_rate': 0.0,
              'kwargs': {'channels': 16, 'depths': [1, 1, 1, 1], 'groups': [1, 2, 4, 8]}}


# ----------------------------------------------------------------------------------------------------------------
# components, one process


def tiny_model(num_classes=10):
    from pretrain.models import create_backbone
    return create_backbone('internimage_t', channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8),
                           num_classes=num_classes, layer_scale=1e-5)


def test_param_groups_layer_decay_dcn_mul_and_no_weight_decay():
    from pretrain.engine.optim import build_param_groups
    model = tiny_model()
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.5, dcn_lr_mul=0.1)
    by_name = {n: g for g in groups for n in g['param_names']}
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())  # every parameter exactly once
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    # 4 blocks -> layer ids 0..3; head shares the last block's group (scale 1), stem the first block's (0.5 ** 3)
    assert by_name['head.weight']['lr_scale'] == 1.0
    assert by_name['patch_embed.conv1.weight']['lr_scale'] == pytest.approx(0.5 ** 3)
    assert by_name['levels.1.blocks.0.mlp.fc1.weight']['lr_scale'] == pytest.approx(0.5 ** 2)
    assert by_name['levels.0.downsample.conv.weight']['lr_scale'] == pytest.approx(0.5 ** 2)  # joins level 1
    # DCN offset projection gets the multiplier, the mask projection does not (official semantics)
    assert by_name['levels.1.blocks.0.dcn.offset.weight']['lr_scale'] == pytest.approx(0.5 ** 2 * 0.1)
    assert by_name['levels.1.blocks.0.dcn.mask.weight']['lr_scale'] == pytest.approx(0.5 ** 2)
    # no weight decay: biases, norms, layer scales
    for name in ('head.bias', 'levels.0.blocks.0.norm1.0.weight', 'levels.0.blocks.0.gamma1'):
        assert by_name[name]['weight_decay'] == 0.0, name
    assert by_name['levels.0.blocks.0.mlp.fc1.weight']['weight_decay'] == 0.05


def test_cosine_schedule_warmup_and_state():
    from pretrain.engine.optim import CosineWarmupSchedule, scaled_lr
    assert scaled_lr(5e-4, 4096, 512) == pytest.approx(4e-3)
    s = CosineWarmupSchedule(lr_peak=1.0, total_steps=110, warmup_steps=10, lr_warmup_init=0.0, lr_min=0.1)
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.5) and s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55) and s.lr_at(110) == pytest.approx(0.1)
    groups = [{'lr_scale': 1.0}, {'lr_scale': 0.25}]
    s.step_to(5, groups)
    assert [g['lr'] for g in groups] == [pytest.approx(0.5), pytest.approx(0.125)]
    t = CosineWarmupSchedule(lr_peak=1.0, total_steps=110, warmup_steps=10)
    t.load_state_dict(s.state_dict())
    assert t.last_step == 5


def test_dist_env_from_torchrun_and_slurm():
    from pretrain.common.dist import detect_env, expand_nodelist
    assert expand_nodelist('gpu[01-03,07],cpu5') == ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']
    assert expand_nodelist('node7') == ['node7']
    e = detect_env({'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'h1', 'MASTER_PORT': '1234'})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == \
        (3, 8, 1, 'h1', 1234, 'torchrun')
    e = detect_env({'SLURM_PROCID': '5', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1', 'SLURM_JOB_ID': '4242',
                    'SLURM_JOB_NODELIST': 'dgx[003-004]'})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == \
        (5, 16, 1, 'dgx003', 10000 + 4242, 'slurm')
    assert detect_env({}).world_size == 1
    assert e.backend == ('nccl' if torch.cuda.is_available() else 'gloo')


def test_only_committed_checkpoints_are_found(tmp_path):
    from pretrain.engine.checkpoint import MARKER, find_complete_checkpoints
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f'step_{step:08d}'
        d.mkdir()
        (d / 'trainer.pt').write_bytes(b'x')
        if complete:
            (d / MARKER).write_text('{}')
    (tmp_path / 'step_junk').mkdir()
    assert [s for s, _ in find_complete_checkpoints(str(tmp_path))] == [2, 4]


def test_average_files_are_listed_in_rank_order_and_an_incomplete_set_is_named(tmp_path):
    from pretrain.common.ema import merge_saved_states
    from pretrain.engine.checkpoint import average_files

    def state(part: torch.Tensor, partitioned: bool, world: int) -> dict:
        return {'shadow': {'w': part}, 'partitioned': {'w': partitioned}, 'shapes': {'w': [10]}, 'num_updates': 3,
                'decay': 0.9, 'world_size': world}

    step = tmp_path / 'step_00000004'
    step.mkdir()
    assert average_files(step, 'ema') == []
    # saved by 3 ranks under ZeRO-2: the whole EMA on rank 0 alone
    torch.save(state(torch.arange(10.0), False, 3), step / 'ema_00000.pt')
    # ZeRO-3 on 3 ranks: partitions of 4 (10 elements padded to 12), written in another order; a stray temp file
    for r in (2, 0, 1):
        torch.save(state(torch.arange(4.0) + 4 * r, True, 3), step / f'teacher_{r:05d}.pt')
    (step / 'teacher_00003.pt.tmp77').write_bytes(b'half a save')
    assert average_files(str(step), 'ema') == [str(step / 'ema_00000.pt')]
    files = average_files(step, 'teacher')
    assert files == [str(step / f'teacher_{r:05d}.pt') for r in range(3)]
    merged = merge_saved_states([torch.load(f, weights_only=True) for f in files])
    assert torch.equal(merged['w'], torch.arange(10.0))
    (step / 'teacher_00001.pt').unlink()
    with pytest.raises(FileNotFoundError, match=rf'{step}: the teacher weights are incomplete \(partitioned over 3 '
                                                r'ranks.*1 of 3 files missing: teacher_00001.pt$'):
        average_files(step, 'teacher')
    (step / 'teacher_00000.pt').unlink()  # rank 0's gone too: the remaining partition still says how many
    with pytest.raises(FileNotFoundError, match=r'2 of 3 files missing: teacher_00000.pt, teacher_00001.pt$'):
        average_files(step, 'teacher')


def test_ema_update_swap_and_reload():
    from pretrain.common.ema import EMA
    model = tiny_model()
    ema = EMA(model, decay=0.75)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    ema.update()
    # two updates towards start + 1: start + (1 - 0.75 ** 2)
    for n in start:
        torch.testing.assert_close(ema.shadow[n], start[n] + (1 - 0.75 ** 2))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    raw = model(x)
    with ema.swapped_in():
        assert torch.equal(dict(model.named_parameters())['head.weight'], ema.shadow['head.weight'])
        assert not torch.equal(model(x), raw)
    assert torch.equal(model(x), raw)  # restored
    other = EMA(tiny_model(), decay=0.75)
    other.load_state_dicts([ema.state_dict()])
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow) and other.num_updates == 2


def test_plan_model_states_follow_zero_accounting():
    from pretrain.engine.plan import model_state_bytes
    p = 1_000_000
    z0 = model_state_bytes(p, stage=0, world_size=8, precision='bf16')
    assert (z0.params, z0.grads, z0.optimizer) == (2 * p, 2 * p, 12 * p)
    z1 = model_state_bytes(p, stage=1, world_size=8)
    z2 = model_state_bytes(p, stage=2, world_size=8)
    z3 = model_state_bytes(p, stage=3, world_size=8, ema=True)
    assert z1.optimizer == 12 * p / 8 and z1.grads == 2 * p
    assert z2.grads == 2 * p / 8 and z2.params == 2 * p
    assert z3.params == 2 * p / 8 and z3.ema == 4 * p / 8
    off = model_state_bytes(p, stage=3, world_size=8, offload_optimizer=True, offload_param=True)
    assert off.optimizer == 0 and off.params == 0 and off.host_offloaded == 12 * p / 8 + 2 * p / 8
    # the M3I teacher: an fp32 average of the backbone's parameters, partitioned under ZeRO-3 only
    t2 = model_state_bytes(p, stage=2, world_size=8, teacher_params=p // 2)
    t3 = model_state_bytes(p, stage=3, world_size=8, teacher_params=p // 2)
    assert t2.teacher == 4 * (p // 2) and t3.teacher == 4 * (p // 2) / 8
    assert t3.total == model_state_bytes(p, stage=3, world_size=8).total + t3.teacher


def test_plan_cli_reports_memory_and_micro_batch(tmp_path):
    import re
    cfg = REPO / 'configs' / 'stage' / 'supervised_tiny.yaml'
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'plan', str(cfg), '--world-size', '8', '--gpu-mem', '80',
                          '--json'], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index('{'):])
    act = out['activations_gib_per_sample']
    assert 0 < act['checkpointing'] < act['no_checkpointing']
    fits = out['largest_micro_batch']
    assert fits['checkpointing'] > fits['no_checkpointing'] > 0
    assert out['model_states_gib']['total'] > 0 and out['params'] > 0
    assert re.match(r'internimage_t', out['model'])


# ----------------------------------------------------------------------------------------------------------------
# multi-process helpers


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=str(REPO), DS_ACCELERATOR='cpu', PYTHONUNBUFFERED='1')
    return env


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_addr',
            '127.0.0.1', '--master_port', str(free_port()), *args]


def run_procs(nproc: int, args: list[str], timeout: float = 300, extra_env: dict | None = None) -> str:
    env = {**_env(), **(extra_env or {})}
    res = subprocess.run(_torchrun(nproc, args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f'exit {res.returncode}\n--- stdout\n{res.stdout[-6000:]}\n--- stderr\n'
                             f'{res.stderr[-6000:]}')
    return res.stdout + res.stderr


def kill_run(proc: subprocess.Popen) -> None:
    """kill -9 a torchrun started with ``start_new_session`` and its rank processes (each rank runs in a session of
    its own, out of reach of ``killpg``), and wait until the ranks are gone (the kernel then drops their locks)."""
    ranks = [int(p) for p in subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True,
                                            text=True).stdout.split()]
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(os.path.exists(f'/proc/{pid}') and Path(f'/proc/{pid}/stat').read_text().split()[2] != 'Z'
              for pid in ranks):
        assert time.time() < deadline, f'rank processes {ranks} still alive'
        time.sleep(0.1)


@pytest.fixture(scope='module')
def shards(real_data, tmp_path_factory) -> str:
    """32 real ImageNet photos (shrunk to 64 px) in 4 shards of 8, labels 0..199 from the sorted class ids."""
    from tests.data_helpers import write_photo_shards
    return write_photo_shards(real_data, tmp_path_factory.mktemp('shards'))


def stage_config(path: Path, urls: str, output_dir: Path, **sections) -> Path:
    """A YAML stage config for the tiny model on the test shards; ``sections`` update the defaults."""
    import yaml
    cfg = {
        'model': dict(TINY_MODEL, drop_path_rate=0.1),
        'data': {'train': [{'name': 'in1k', 'urls': urls}], 'val': [{'name': 'in1k', 'urls': urls}],
                 'img_size': 32, 'num_workers': 1,
                 'auto_augment': None, 're_prob': 0.0, 'color_jitter': 0.4},
        'loss': {'label_smoothing': 0.1, 'mixup_alpha': 0.8, 'cutmix_alpha': 1.0},
        'optim': {'lr_base': 2e-3, 'layer_decay': 0.9, 'dcn_lr_mul': 0.1},
        'schedule': {'total_steps': 6, 'warmup_steps': 2, 'lr_scale_by_batch': False},
        'deepspeed': {'zero_stage': 2, 'precision': 'fp32', 'micro_batch_size': 4},
        'ema': {'enabled': True, 'decay': 0.9},
        'checkpoint': {'interval_steps': 3, 'keep_last': 5},
        'logging': {'interval_steps': 1, 'tensorboard': False},
        'run': {'output_dir': str(output_dir), 'seed': 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


def consolidated(step_dir: str, step: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a committed checkpoint via DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(step_dir, tag=f'global_step{step}')


def ema_of(step_dir: str) -> dict[str, torch.Tensor]:
    """The whole saved EMA of a checkpoint, merged from its rank files as export reads it."""
    from pretrain.engine.checkpoint import load_average
    return load_average(step_dir, 'ema')


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return [r['loss']['ce'] for r in rows if r['split'] == 'train']


def _listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> size)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob('*')) if p.is_file()}


def assert_bitwise(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f'{what}: {len(diff)} tensors differ, e.g. {diff[:3]}'


# ----------------------------------------------------------------------------------------------------------------
# ZeRO 1/2/3 on 2 ranks == one process, same global batch


def _parity_worker(out_dir: str, stages: list[int], precision: str, eps: float) -> None:
    """Runs 5 steps of every ZeRO stage in ``stages`` on fixed batches; rank 0 writes losses and fp32 weights."""
    import deepspeed

    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer

    world = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    # On a GPU (tests/test_engine_gpu.py): convolutions and matmuls in fp32, not TF32, and deterministic convolutions,
    # so that the fp32 tolerances hold there too.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    global_batch, steps = 8, 5
    mb = global_batch // 2  # micro-batch 4: 2 ranks x 1 micro-step, or 1 rank x 2 micro-steps
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(steps, global_batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 200, (steps, global_batch), generator=gen)
    for stage in stages:
        cfg = config_from_dict({
            'model': TINY_MODEL,
            'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
            'loss': {'label_smoothing': 0.1},
            'optim': {'lr_base': 2e-3, 'layer_decay': 0.9, 'dcn_lr_mul': 0.1, 'eps': eps},
            'schedule': {'total_steps': steps, 'warmup_steps': 2, 'lr_scale_by_batch': False},
            # persistence threshold 1000: under ZeRO-3 small tensors stay gathered, larger ones are partitioned
            'deepspeed': {'zero_stage': stage, 'precision': precision, 'micro_batch_size': mb,
                          'grad_accum_steps': global_batch // (mb * world),
                          'stage3_param_persistence_threshold': 1000},
            'ema': {'enabled': True, 'decay': 0.5},
            'checkpoint': {'resume': 'none'},
            'logging': {'tensorboard': False, 'progress': False},
            'run': {'output_dir': os.path.join(out_dir, f'run_{stage}_{world}'), 'seed': 0},
        })
        trainer = Trainer(cfg, build_data=False)
        step_losses = []
        for s in range(steps):
            micro = iter(range(global_batch // (mb * world)))

            def next_micro(s=s, micro=micro):
                i = next(micro)
                lo = (rank * (global_batch // world)) + i * mb
                return {'image': images[s, lo:lo + mb], 'label': labels[s, lo:lo + mb], 'key': [''] * mb}

            res = trainer.train_step(next_micro)
            from pretrain.common.dist import all_reduce_sum
            step_losses.append(float(all_reduce_sum(torch.tensor([res.loss], dtype=torch.float64))[0]) / world)
        params = list(trainer.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            weights = {n: p.detach().float().cpu().clone() for n, p in trainer.engine.module.named_parameters()}
        ema = {k: v.cpu() for k, v in trainer.ema.full_state_dict().items()}
        # Evaluating with the EMA swapped in == a plain copy of the model loaded with the EMA state_dict.
        from pretrain.engine.trainer import build_model
        plain = build_model(cfg).eval()
        plain.load_state_dict(ema, strict=False)  # num_batches_tracked is not averaged
        trainer.engine.eval()
        with torch.no_grad(), trainer.ema.swapped_in():
            swapped = trainer.engine(images[0].to(trainer.device, trainer.dtype)).float().cpu()
        with torch.no_grad():
            ema_eval_diff = (swapped - plain(images[0]).float()).abs().max().item()
            restored_diff = max((p.detach().float().cpu() - weights[n]).abs().max().item()
                                for n, p in trainer.engine.module.named_parameters() if p.numel() > 0)
        if rank == 0:
            torch.save({'losses': step_losses, 'weights': weights, 'ema': ema, 'ema_eval_diff': ema_eval_diff,
                        'restored_diff': restored_diff, 'device': str(trainer.device)},
                       os.path.join(out_dir, f'zero{stage}_world{world}.pt'))
        del trainer


@pytest.mark.slow
@pytest.mark.dist
def test_zero_stages_match_single_process(tmp_path):
    """ZeRO 1, 2 and 3 on 2 ranks x micro-batch 4 vs plain DeepSpeed (ZeRO-0) on 1 rank x 2 micro-steps of 4: the
    same global batch of 8 and the same micro-batches (so BatchNorm sees the same batch statistics), fp32.

    Tolerance after 5 AdamW steps (lr 2e-3): weights and EMA weights within atol 2e-5 + rtol 1e-4, losses within
    1e-6 relative. Measured: <= 3e-7 for every parameter except ``levels.3.norm.0.bias`` (~1e-5): it feeds a 1x1
    conv followed by BatchNorm, which cancels it, so its gradient is rounding noise that Adam normalises
    (eps 1e-6 here; with 1e-8 that noise alone moves it by +-lr). A rank that skipped the gradient reduction would
    be off by ~1e-3. BatchNorm running stats are not compared: on 2 ranks they are averaged once per step, on one
    rank updated once per micro-step."""
    run_parity(tmp_path, 1, '0')
    run_parity(tmp_path, 2, '1,2,3')
    assert_parity(tmp_path, (1, 2, 3))


def run_parity(out_dir: Path, nproc: int, stages: str, extra_env: dict | None = None) -> None:
    """This file's parity worker on ``nproc`` ranks for ZeRO ``stages`` ('1,2,3'), fp32, Adam eps 1e-6."""
    run_procs(nproc, [str(Path(__file__).resolve()), 'parity', str(out_dir), stages, 'fp32', '1e-6'],
              extra_env=extra_env)


def assert_parity(out_dir: Path, stages: tuple[int, ...]) -> None:
    """The 2-rank results of ``stages`` == the 1-rank ZeRO-0 reference (test_zero_stages_match_single_process
    explains the tolerance)."""
    ref = torch.load(out_dir / 'zero0_world1.pt')
    assert all(math.isfinite(v) for v in ref['losses'])
    assert ref['losses'][0] != ref['losses'][-1]
    for stage in stages:
        got = torch.load(out_dir / f'zero{stage}_world2.pt')
        assert got['ema_eval_diff'] < 1e-4, f'ZeRO-{stage}: eval with the EMA swapped in is not the EMA model'
        assert got['restored_diff'] == 0, f'ZeRO-{stage}: weights not restored after the EMA eval'
        assert got['losses'] == pytest.approx(ref['losses'], rel=1e-6), f'ZeRO-{stage} losses'
        assert got['weights'].keys() == ref['weights'].keys()
        for k in ref['weights']:
            torch.testing.assert_close(got['weights'][k], ref['weights'][k], rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=k, stage=stage: f'ZeRO-{stage} {k}: {m}')
            torch.testing.assert_close(got['ema'][k], ref['ema'][k], rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=k, stage=stage: f'ZeRO-{stage} EMA {k}: {m}')


# ----------------------------------------------------------------------------------------------------------------
# a NaN gradient with a finite loss: the step is skipped for real, under every ZeRO stage and precision


def _optimizer_state(engine) -> dict:
    """A copy of this rank's optimizer state (Adam moments and step counts of the tensors it updates), keyed by
    (tensor index, name): the torch optimizer inside DeepSpeed's wrapper, or the plain one under ZeRO-0 fp32."""
    basic = getattr(engine.optimizer, 'optimizer', engine.optimizer)
    # by insertion order: ZeRO-3 hands its optimizer one flat partition at a time, so param_groups are empty here
    return {(i, k): v.detach().float().cpu().clone() if torch.is_tensor(v) else torch.tensor(float(v))
            for i, state in enumerate(basic.state.values()) for k, v in state.items()}


def _nonfinite_grad_worker(out_dir: str, stages: list[int], precision: str) -> None:
    """Per ZeRO stage: one good step, then a step whose loss is finite but where rank 0 (of 2) gets a NaN in one
    element of one parameter's gradient (a tensor hook), then a good step again. Writes what the NaN step changed."""
    from pretrain.config import config_from_dict

    rank = int(os.environ.get('RANK', 0))
    report = {}
    for stage in stages:
        cfg = config_from_dict({
            'model': TINY_MODEL,
            'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
            'optim': {'lr_base': 2e-3, 'weight_decay': 0.05},
            'schedule': {'total_steps': 3, 'warmup_steps': 0, 'lr_scale_by_batch': False},
            'deepspeed': {'zero_stage': stage, 'precision': precision, 'micro_batch_size': 4, 'grad_clip': 1.0,
                          'stage3_param_persistence_threshold': 1000},
            'ema': {'enabled': True, 'decay': 0.5},
            'checkpoint': {'resume': 'none'},
            'logging': {'tensorboard': False, 'progress': False},
            'run': {'output_dir': os.path.join(out_dir, f'run_{stage}'), 'seed': 0},
        })
        report[stage] = _nan_gradient_step(cfg, poison=rank == 0)
    torch.save(report, os.path.join(out_dir, f'nonfinite_{precision}_rank{rank}.pt'))


def _nan_gradient_step(cfg, poison: bool) -> dict:
    """Good step, NaN step (this rank's gradient poisoned when ``poison``), good step: what the NaN step changed."""
    import deepspeed

    from pretrain.engine.trainer import NonFiniteError, Trainer

    gen = torch.Generator().manual_seed(99)
    images, labels = torch.randn(3, 4, 3, 32, 32, generator=gen), torch.randint(0, 200, (3, 4), generator=gen)
    trainer = Trainer(cfg, build_data=False)
    module = trainer.engine.module
    params = list(module.parameters())

    def weights() -> dict:
        with deepspeed.zero.GatheredParameters(params, enabled=cfg.deepspeed.zero_stage == 3):
            return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}

    def step(s: int):
        return trainer.train_step(lambda: {'image': images[s], 'label': labels[s], 'key': [''] * 4})

    def nan_in_first_element(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = float('nan')
        return grad

    step(0)
    before = weights(), _optimizer_state(trainer.engine), trainer.ema.full_state_dict()
    target = dict(module.named_parameters())['levels.1.blocks.0.mlp.fc1.weight']
    hook = target.register_hook(nan_in_first_element) if poison else None
    res = step(1)
    if hook is not None:
        hook.remove()
    after = weights(), _optimizer_state(trainer.engine), trainer.ema.full_state_dict()
    changed = {what: sorted(str(k) for k in b if not torch.equal(b[k].cpu(), a[k].cpu()))
               for what, b, a in zip(('weights', 'optimizer', 'ema'), before, after)}
    try:
        next_skipped = step(2).skipped
    except NonFiniteError:  # NaN weights from the NaN step make every later loss NaN
        next_skipped = True
    now = weights()
    return {'loss_finite': math.isfinite(res.loss), 'skipped': res.skipped,
            'nonfinite_total': trainer.state.nonfinite_total, 'changed': changed,
            'optimizer_tensors': len(before[1]), 'next_skipped': next_skipped,
            'next_finite': all(bool(torch.isfinite(w).all()) for w in now.values()),
            'next_moved': not torch.equal(now['levels.1.blocks.0.mlp.fc1.weight'],
                                          after[0]['levels.1.blocks.0.mlp.fc1.weight'])}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_nan_gradient_with_finite_loss_changes_nothing(tmp_path, precision):
    """DeepSpeed skips a non-finite step only in some configurations (ZeRO-0 fp32 hands a NaN to AdamW); the
    trainer's own check makes it a real skip everywhere: on both ranks, after a step where rank 0's gradient of one
    weight holds a NaN (the loss finite), the weights, Adam's moments and step counts and the EMA are exactly as
    before, the step is counted as non-finite, and the next step trains normally."""
    run_procs(2, [str(Path(__file__).resolve()), 'nonfinite', str(tmp_path), '0,1,2,3', precision], timeout=600)
    for rank in (0, 1):
        report = torch.load(tmp_path / f'nonfinite_{precision}_rank{rank}.pt')
        for stage in (0, 1, 2, 3):
            r = report[stage]
            what = f'ZeRO-{stage} {precision} rank {rank}'
            assert r['loss_finite'] and r['skipped'] and r['nonfinite_total'] == 1, (what, r)
            assert r['optimizer_tensors'] > 0, what
            assert r['changed'] == {'weights': [], 'optimizer': [], 'ema': []}, (what, r['changed'])
            assert not r['next_skipped'] and r['next_finite'] and r['next_moved'], (what, r)


# ----------------------------------------------------------------------------------------------------------------
# M3I on 2 ranks == one process on the concatenated batch


def _m3i_parity_worker(out_dir: str) -> None:
    """3 steps of supervised + contrastive + MIM (teacher) on a tiny ConvNeXt V2 (no BatchNorm, so the batch split
    does not change any statistics), ZeRO-0 fp32: 2 ranks x 4 or 1 process x 8, the same global batches, through
    BatchStream (the counts of captioned and labelled samples summed over ranks). Rank 0 writes the losses, the
    first step's averaged gradients, the final weights and the teacher."""
    from pretrain.common.dist import all_reduce_sum
    from pretrain.config import config_from_dict
    from pretrain.engine.data import BatchStream
    from pretrain.engine.trainer import Trainer

    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    steps, global_batch = 3, 8
    mb = global_batch // world
    cfg = config_from_dict({
        'model': {'name': 'convnextv2_atto', 'num_classes': 10, 'drop_path_rate': 0.0,
                  'kwargs': {'dims': [8, 16, 32, 64], 'depths': [1, 1, 2, 1]}},
        'objective': {'kind': 'multi', 'supervised': {'weight': 1.0}, 'fcmae': {'weight': 0.0},
                      'contrastive': {'weight': 1.0, 'embed_dim': 32, 'text_width': 32, 'text_layers': 1,
                                      'text_heads': 2, 'context_length': 16},
                      'mim': {'weight': 1.0, 'decoder_dim': 16, 'teacher_decay': 0.5}},
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 64},
        'loss': {'label_smoothing': 0.1, 'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
        'optim': {'lr_base': 1e-3, 'eps': 1e-6},
        'schedule': {'total_steps': steps, 'warmup_steps': 1, 'lr_scale_by_batch': False},
        'deepspeed': {'zero_stage': 0, 'precision': 'fp32', 'micro_batch_size': mb},
        'ema': {'enabled': False},
        'checkpoint': {'resume': 'none'},
        'logging': {'tensorboard': False, 'progress': False},
        'run': {'output_dir': os.path.join(out_dir, f'run_{world}'), 'seed': 0},
    })
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(steps, global_batch, 3, 64, 64, generator=gen)
    labels = torch.randint(0, 10, (steps, global_batch), generator=gen)
    labels[:, [1, 2, 6]] = -1  # unlabelled: 2 on rank 0, 1 on rank 1
    text = torch.randint(1, 1000, (steps, global_batch, 16), generator=gen)
    has_text = torch.tensor([True, True, True, False, True, False, False, False])  # captions: 3 on rank 0, 1 on 1
    lo = rank * mb
    trainer = Trainer(cfg, build_data=False)
    # one pass of exactly the steps' batches: the stream never rolls over, so a list is loader enough
    stream = BatchStream([{'image': images[s, lo:lo + mb], 'label': labels[s, lo:lo + mb], 'text': text[s, lo:lo + mb],
                           'has_text': has_text[lo:lo + mb], 'key': [''] * mb} for s in range(steps)],
                         trainer.state, counts_of=trainer.objective.batch_counts)
    grads: dict = {}
    engine_step = trainer.engine.step

    def step_capturing_gradients(*args, **kwargs):
        if not grads:  # the first boundary: ZeRO-0's gradients are all-reduced (averaged) here
            grads.update({n: p.grad.detach().clone() for n, p in trainer.engine.module.named_parameters()
                          if p.grad is not None})
        return engine_step(*args, **kwargs)

    trainer.engine.step = step_capturing_gradients
    step_losses = []
    for _ in range(steps):
        res = trainer.train_step(stream.next_batch)
        names = sorted(res.part_means)
        mine = torch.stack([res.loss_mean, *(res.part_means[k] for k in names)]).double()
        step_losses.append(dict(zip(['total', *names], (all_reduce_sum(mine) / world).tolist())))
    if rank == 0:
        torch.save({'losses': step_losses, 'grads': grads,
                    'weights': {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()},
                    'teacher': trainer.objective.teacher.full_state_dict()},
                   os.path.join(out_dir, f'm3i_world{world}.pt'))


@pytest.mark.slow
@pytest.mark.dist
def test_m3i_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    """Supervised + contrastive + MIM with its teacher, 2 ranks x 4 vs 1 process x 8, uneven captions and labels
    across the ranks: the same losses (each part, mean over ranks), the same first-step gradients, and after 3 AdamW
    steps the same weights and teacher. What must hold for it: the supervised loss normalised by the global label
    count, the contrastive loss over both ranks' pairs with the gradient summed back (gather with grad), the MIM
    masks drawn per sample of the global batch, the teacher fed the rank's images. Tolerances are float32 summation
    order (measured: losses within 1e-7 relative, gradients and weights within 1e-5 absolute)."""
    run_procs(1, [str(Path(__file__).resolve()), 'm3i_parity', str(tmp_path)], timeout=300)
    run_procs(2, [str(Path(__file__).resolve()), 'm3i_parity', str(tmp_path)], timeout=300)
    one, two = torch.load(tmp_path / 'm3i_world1.pt'), torch.load(tmp_path / 'm3i_world2.pt')
    assert set(one['losses'][0]) == {'total', 'supervised', 'contrastive', 'mim'}
    for a, b in zip(one['losses'], two['losses']):
        assert b == pytest.approx(a, rel=1e-5)
    assert one['grads'].keys() == two['grads'].keys() == one['weights'].keys()
    for what in ('grads', 'weights', 'teacher'):
        assert one[what].keys() == two[what].keys()
        for k in one[what]:
            torch.testing.assert_close(two[what][k], one[what][k], rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=k, what=what: f'{what} {k}: {m}')


# ----------------------------------------------------------------------------------------------------------------
# BatchStream: ranks whose epochs end at different steps


class _ShortEpochs:
    """A loader whose pass holds ``length`` batches; batch i of epoch e has labels ``[e, i, -1]`` (2 labelled) and
    ``has_text`` on its first ``i`` samples. Records the epochs it was set to."""

    def __init__(self, length: int):
        self.length, self.epoch, self.epochs_set = length, 0, []

    def __iter__(self):
        for i in range(self.length):
            yield {'label': torch.tensor([self.epoch, i, -1]), 'has_text': torch.arange(3) < i}

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch = epoch
        self.epochs_set.append(epoch)


def _stream_worker(out_dir: str) -> None:
    import torch.distributed as dist

    from pretrain.engine.checkpoint import TrainState
    from pretrain.engine.data import BatchStream
    from pretrain.objectives.steps import M3IStep

    dist.init_process_group('gloo')
    rank = dist.get_rank()
    loader, state = _ShortEpochs(3 if rank == 0 else 5), TrainState()
    stream = BatchStream(loader, state, counts_of=M3IStep.batch_counts)
    seen = []
    for _ in range(10):
        batch = stream.next_batch()
        seen.append({'epoch': state.epoch, 'labels': batch['label'].tolist(),
                     'global_counts': batch['global_counts'].tolist()})
    Path(out_dir, f'stream_{rank}.json').write_text(json.dumps({'seen': seen, 'epochs_set': loader.epochs_set}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_batch_stream_ranks_whose_epochs_end_at_different_steps(tmp_path):
    """Rank 0's pass holds 3 batches, rank 1's 5: both start every epoch together after 3 (rank 1 drops its last
    2), in step; the objective's counts ride in the same all-reduce and are the sum over both ranks' batches."""
    run_procs(2, [str(Path(__file__).resolve()), 'stream', str(tmp_path)], timeout=120)
    runs = [json.loads((tmp_path / f'stream_{r}.json').read_text()) for r in (0, 1)]
    for rank, run in enumerate(runs):
        assert run['epochs_set'] == [1, 2, 3], rank
        assert [(s['epoch'], s['labels'][:2]) for s in run['seen']] == [(e, [e, i]) for e in range(4)
                                                                        for i in range(3)][:10], rank
        # per batch i: i captioned and 2 labelled samples on each rank
        assert [s['global_counts'] for s in run['seen']] == [[2.0 * i, 4.0] for e in range(4) for i in range(3)][:10]


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm statistics: averaged over the ranks after every step


def _bn_worker(out_dir: str) -> None:
    """2 ranks, different batches: each rank's own BatchNorm statistics (a plain copy of the model, the same
    forward) against the buffers after ``train_step``; writes both."""
    import torch.distributed as dist

    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer, build_model

    cfg = config_from_dict({
        'model': TINY_MODEL,
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
        'loss': {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
        'schedule': {'total_steps': 2, 'warmup_steps': 0, 'lr_scale_by_batch': False},
        'deepspeed': {'zero_stage': 2, 'precision': 'fp32', 'micro_batch_size': 4},
        'ema': {'enabled': False},
        'checkpoint': {'resume': 'none'},
        'logging': {'tensorboard': False, 'progress': False},
        'run': {'output_dir': os.path.join(out_dir, 'run'), 'seed': 0},
    })
    trainer = Trainer(cfg, build_data=False)
    rank, module = trainer.rank, trainer.engine.module
    gen = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(2):
        batch = {'image': torch.randn(4, 3, 32, 32, generator=gen) * (1 + rank),
                 'label': torch.randint(0, 200, (4,), generator=gen), 'key': [''] * 4}
        alone = build_model(cfg)
        alone.load_state_dict(module.state_dict())
        alone.train()
        with torch.no_grad():
            alone(batch['image'])
        trainer.train_step(lambda b=batch: b)
        out.append({'alone': {n: b.clone() for n, b in alone.named_buffers() if b.is_floating_point()},
                    'synced': {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}})
    torch.save(out, os.path.join(out_dir, f'bn_{rank}.pt'))
    del trainer
    dist.barrier()


@pytest.mark.slow
@pytest.mark.dist
def test_batchnorm_statistics_are_the_mean_over_ranks_after_each_step(tmp_path):
    """After every step each rank holds the mean of the two ranks' own BatchNorm running statistics (the classifier
    head's BatchNorm; rank 1's images are scaled, so the ranks' own statistics differ)."""
    run_procs(2, [str(Path(__file__).resolve()), 'bn', str(tmp_path)], timeout=300)
    runs = [torch.load(tmp_path / f'bn_{r}.pt') for r in (0, 1)]
    for step in range(2):
        alone = [runs[r][step]['alone'] for r in (0, 1)]
        assert alone[0].keys() == {'conv_head.1.0.running_mean', 'conv_head.1.0.running_var'}
        for name in alone[0]:
            assert not torch.allclose(alone[0][name], alone[1][name]), name
            mean = (alone[0][name] + alone[1][name]) / 2
            for r in (0, 1):
                torch.testing.assert_close(runs[r][step]['synced'][name], mean, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name, r=r, step=step: f'rank {r} step {step} {name}: {m}')


# ----------------------------------------------------------------------------------------------------------------
# exact resume, kill -9 mid-save, another world size


@pytest.fixture(scope='module')
def uninterrupted(shards, tmp_path_factory) -> Path:
    """6 steps on 2 ranks through the CLI without interruption (ZeRO-3, fp32, Mixup, drop path, EMA; crosses an
    epoch boundary: 32 samples = 4 steps per epoch). Checkpoints at 3 and 6."""
    d = tmp_path_factory.mktemp('uninterrupted')
    cfg = stage_config(d / 'cfg.yaml', shards, d / 'run', deepspeed={'zero_stage': 3})
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg)])
    return d / 'run'


@pytest.mark.slow
@pytest.mark.dist
def test_exact_resume_is_bitwise(shards, uninterrupted, tmp_path):
    """3 steps, stop, resume, 3 more == 6 uninterrupted: fp32 weights, EMA and every logged loss bitwise."""
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', deepspeed={'zero_stage': 3})
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg), 'run.stop_after_steps=3'])
    first = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
    assert first['step'] == 3
    for key in ('loss', 'lr', 'grad_norm', 'images_per_s', 'samples_seen', 'peak_memory_mib', 'data_skips',
                'nonfinite_total', 'epoch'):
        assert key in first, key
    assert first['samples_seen'] == 3 * 8 and first['peak_memory_mib'] > 0 and first['data_skips'] == {}
    out = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)])
    assert 'resumed from' in out and '(exact)' in out
    ref_dir, got_dir = uninterrupted / 'checkpoints' / 'step_00000006', tmp_path / 'run' / 'checkpoints' / \
        'step_00000006'
    assert_bitwise(consolidated(str(got_dir), 6), consolidated(str(ref_dir), 6), 'weights')
    assert_bitwise(ema_of(str(got_dir)), ema_of(str(ref_dir)), 'EMA')
    assert losses(tmp_path / 'run') == losses(uninterrupted)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['step'] == 6 and summary['samples_seen'] == 6 * 8
    # eval reduced over both ranks: every val image counted once, raw and EMA
    assert summary['eval']['raw']['images'] == 32 and summary['eval']['ema']['images'] == 32
    assert 0 <= summary['eval']['raw']['top1'] <= summary['eval']['raw']['top5'] <= 100
    assert summary['eval'] == json.loads((uninterrupted / 'summary.json').read_text())['eval']


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.extended  # 6 min (a cold inductor compile per run): make test-extended
def test_exact_resume_is_bitwise_with_compile(shards, tmp_path):
    """run.compile: true (inductor through DeepSpeed's engine.compile, ZeRO-3 on 2 ranks): 3 steps, stop, resume, 3
    more == 6 uninterrupted compiled steps, bitwise (weights, EMA, losses); checkpoint and export keys are the
    model's own, with no '_orig_mod.' prefix."""
    ref = stage_config(tmp_path / 'ref.yaml', shards, tmp_path / 'ref', deepspeed={'zero_stage': 3},
                       run={'compile': True})
    out = run_procs(2, ['-m', 'pretrain', 'train', str(ref)], timeout=1800)
    assert 'model compiled' in out
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', deepspeed={'zero_stage': 3},
                       run={'compile': True})
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg), 'run.stop_after_steps=3'], timeout=1800)
    out = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)], timeout=1800)
    assert 'resumed from' in out and '(exact)' in out
    ref_dir, got_dir = (d / 'checkpoints' / 'step_00000006' for d in (tmp_path / 'ref', tmp_path / 'run'))
    weights = consolidated(str(got_dir), 6)
    assert_bitwise(weights, consolidated(str(ref_dir), 6), 'weights')
    assert_bitwise(ema_of(str(got_dir)), ema_of(str(ref_dir)), 'EMA')
    assert losses(tmp_path / 'run') == losses(tmp_path / 'ref')
    from pretrain.config import load_config
    from pretrain.engine.trainer import build_model
    own_keys = set(build_model(load_config(str(cfg))).state_dict())
    assert set(weights) <= own_keys and not [k for k in weights if '_orig_mod' in k]
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'export', str(got_dir), '--format', 'safetensors',
                          '--out', str(tmp_path / 'w.safetensors')], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / 'w.safetensors'))
    assert exported and not [k for k in exported if '_orig_mod' in k] and set(exported) <= own_keys


@pytest.mark.slow
@pytest.mark.dist
def test_kill_during_save_resumes_from_previous_complete(shards, uninterrupted, tmp_path):
    """kill -9 of both ranks while step 4 is being saved (rank files written, no commit marker); the restart resumes
    from step 2, redoes the step-4 save, and ends bitwise equal to the uninterrupted run."""
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', deepspeed={'zero_stage': 3},
                       checkpoint={'interval_steps': 2, 'keep_last': 2})
    ckpts = tmp_path / 'run' / 'checkpoints'
    env = {**_env(), 'PRETRAIN_DEBUG_SAVE_PAUSE': '4:120'}
    proc = subprocess.Popen(_torchrun(2, ['-m', 'pretrain', 'train', str(cfg)]), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        target = ckpts / 'step_00000004'
        while time.time() < deadline and not ((target / 'rank_00001.pt').exists() and (target / 'trainer.pt').exists()):
            assert proc.poll() is None, 'the run ended before the save of step 4'
            time.sleep(0.2)
        assert (target / 'rank_00000.pt').exists(), 'the save of step 4 never started'
    finally:
        kill_run(proc)  # torchrun and both ranks, mid-save
    assert not (target / 'COMPLETE').exists() and (ckpts / 'step_00000002' / 'COMPLETE').exists()
    out = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)])
    assert 'step_00000002 at step 2 (exact)' in out
    assert (target / 'COMPLETE').exists()
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith('step_')) == ['step_00000004',
                                                                                     'step_00000006']
    assert_bitwise(consolidated(str(ckpts / 'step_00000006'), 6),
                   consolidated(str(uninterrupted / 'checkpoints' / 'step_00000006'), 6), 'weights')


@pytest.mark.slow
@pytest.mark.dist
def test_resume_on_one_rank_from_two_rank_checkpoint(shards, uninterrupted, tmp_path):
    """A 2-rank ZeRO-3 checkpoint (step 3) resumes on 1 rank through ds_to_universal, optimizer state kept: the
    weights after loading are the saved ones, and training goes on to step 6 with the same global batch."""
    import shutil
    src = uninterrupted / 'checkpoints' / 'step_00000003'
    run = tmp_path / 'run'
    shutil.copytree(src, run / 'checkpoints' / 'step_00000003')
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, run, deepspeed={'zero_stage': 3, 'grad_accum_steps': 2},
                       checkpoint={'interval_steps': 1, 'keep_last': 5})
    out = run_procs(1, ['-m', 'pretrain', 'train', str(cfg)])
    assert '(universal)' in out and 'data loader position' in out
    assert 'universal conversion done' in out
    # the committed folder was not written: the conversion lived beside it, until step 4 committed
    assert _listing(run / 'checkpoints' / 'step_00000003') == _listing(src)
    assert not (run / 'checkpoints' / 'step_00000003.universal').exists()
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['step'] == 6 and summary['world_size'] == 1
    # the first 1-rank checkpoint (step 4) started from the 2-rank weights: one AdamW step (lr <= 2e-3) away
    saved = consolidated(str(src), 3)
    after = consolidated(str(run / 'checkpoints' / 'step_00000004'), 4)
    params = [k for k in saved if 'running_' not in k and 'num_batches' not in k]  # BN buffers move by design
    delta = max((after[k] - saved[k]).abs().max().item() for k in params)
    assert 0 < delta < 5e-3
    # the optimizer state came along: Adam's step count goes on from 3 (a fresh optimizer would be at 1)
    for step in (4, 5):
        optim_file, = (run / 'checkpoints' / f'step_{step:08d}' / f'global_step{step}').glob('*optim_states.pt')
        state = torch.load(optim_file, weights_only=False)['optimizer_state_dict']['optimizer_state_dict']['state']
        assert {float(v['step']) for v in state.values()} == {float(step)}
    assert all(math.isfinite(v) for v in losses(run))


@pytest.mark.slow
@pytest.mark.dist
def test_resampled_epoch_goes_on_at_another_world_size(shards, tmp_path):
    """Resampled mode, 48 samples per epoch, ZeRO-2. 2 ranks x 4 images train 2 steps (16 samples), then the run
    resumes on 1 rank (global batch 4) through the universal checkpoint. The rest of epoch 0 is 32 samples, i.e.
    8 steps, so epoch 1 begins at step 11; restarting the epoch would have put it at step 15."""
    run = tmp_path / 'run'
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, run, data={'mode': 'resampled', 'samples_per_epoch': 48},
                       schedule={'total_steps': 12, 'warmup_steps': 2},
                       checkpoint={'interval_steps': 2, 'keep_last': 2})
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg), 'run.stop_after_steps=2'])
    out = run_procs(1, ['-m', 'pretrain', 'train', str(cfg)])
    assert '(universal)' in out and 'epoch 0 goes on with fresh draws after its 16 samples already seen' in out
    rows = [r for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if r['split'] == 'train']
    epochs = {r['step']: r['epoch'] for r in rows}
    assert [epochs[s] for s in range(1, 13)] == [0] * 10 + [1] * 2
    assert rows[-1]['samples_seen'] == 16 + 10 * 4
    # ZeRO-2 through the universal checkpoint (ds_to_universal needs --inject_missing_state for ZeRO 1/2 saves):
    # Adam's step count went on from 2 (a fresh optimizer would be at 10 by step 12)
    optim_file, = (run / 'checkpoints' / 'step_00000012' / 'global_step12').glob('*optim_states.pt')
    state = torch.load(optim_file, weights_only=False)['optimizer_state_dict']['base_optimizer_state']['state']
    assert {float(v['step']) for v in state.values()} == {12.0}


@pytest.mark.slow
@pytest.mark.dist
def test_epoch_mode_goes_on_at_another_world_size(shards, tmp_path):
    """Epoch mode, 32 samples. 2 ranks x 4 images train 2 steps (16 samples), then the run resumes on 1 rank (global
    batch 4): its loader reads the 16 samples the 2 ranks had not (each old worker's position mapped onto the new
    plan), 4 steps, so epoch 1 begins at step 7; restarting the epoch would have put it at step 11."""
    run = tmp_path / 'run'
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, run, schedule={'total_steps': 12, 'warmup_steps': 2},
                       checkpoint={'interval_steps': 2, 'keep_last': 2})
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg), 'run.stop_after_steps=2'])
    out = run_procs(1, ['-m', 'pretrain', 'train', str(cfg)])
    assert '(universal)' in out
    assert 'epoch 0 goes on with the 16 samples that the 2 saved ranks had not read (16 read)' in out, out[-3000:]
    rows = [r for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if r['split'] == 'train']
    epochs = {r['step']: r['epoch'] for r in rows}
    assert [epochs[s] for s in range(1, 13)] == [0] * 6 + [1] * 6
    assert rows[-1]['samples_seen'] == 16 + 10 * 4


@pytest.mark.slow
@pytest.mark.dist
def test_epoch_mode_goes_on_from_one_rank_to_two(shards, tmp_path):
    """Epoch mode, 32 samples. 1 rank x 4 images trains 2 steps (8 samples), then 2 ranks resume: rank 0 reads the
    saved per-rank state and broadcasts it. With that file unreadable both ranks stop with rank 0's error (none
    waits); restored, the 2 ranks read the 24 samples not yet read (3 steps), so epoch 1 begins at step 6."""
    run = tmp_path / 'run'
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, run, schedule={'total_steps': 8, 'warmup_steps': 2},
                       checkpoint={'interval_steps': 2, 'keep_last': 2})
    run_procs(1, ['-m', 'pretrain', 'train', str(cfg), 'run.stop_after_steps=2'])
    rank_file = run / 'checkpoints' / 'step_00000002' / 'rank_00000.pt'
    good = rank_file.read_bytes()
    rank_file.write_bytes(good[:len(good) // 2])
    with pytest.raises(AssertionError) as failed:
        run_procs(2, ['-m', 'pretrain', 'train', str(cfg)])
    said = str(failed.value)
    assert f'rank 0 could not read the per-rank states saved in {rank_file.parent}' in said, said[-4000:]
    rank_file.write_bytes(good)
    out = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)])
    assert '(universal)' in out and 'epoch 0 goes on with the 24 samples' in out, out[-3000:]
    rows = [r for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if r['split'] == 'train']
    epochs = {r['step']: r['epoch'] for r in rows}
    assert [epochs[s] for s in range(1, 9)] == [0] * 5 + [1] * 3
    assert rows[-1]['samples_seen'] == 8 + 6 * 8


@pytest.mark.slow
@pytest.mark.dist
def test_nonfinite_steps_are_skipped_then_stop_names_step_and_checkpoint(shards, tmp_path):
    """An absurd learning rate makes the weights overflow after the first steps: non-finite steps are skipped and
    counted, and after 2 in a row the run stops with exit status 3 and an error naming the step and the last good
    checkpoint."""
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', optim={'lr_base': 1e30},
                       schedule={'total_steps': 20, 'warmup_steps': 0}, checkpoint={'interval_steps': 1},
                       run={'output_dir': str(tmp_path / 'run'), 'seed': 0, 'max_nonfinite_in_a_row': 2})
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'train', str(cfg)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-3000:]
    committed = sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir() if (p / 'COMPLETE').exists())
    assert committed, 'at least the first step should have been good'
    assert '2 non-finite steps in a row' in res.stderr
    assert f'last good checkpoint: {tmp_path / "run" / "checkpoints" / committed[-1]}' in res.stderr
    last_good = tmp_path / 'run' / 'checkpoints' / committed[-1]
    weights = consolidated(str(last_good), int(committed[-1].split('_')[1]))
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values()), f'{last_good} is not finite'
    assert all(bool(torch.isfinite(w).all()) for w in ema_of(str(last_good)).values()), f'{last_good} EMA'
    assert 'non-finite loss, skipped' in res.stdout


@pytest.mark.slow
@pytest.mark.dist
def test_weights_only_restart_at_another_world_size_says_so(shards, uninterrupted, tmp_path):
    """checkpoint.on_world_size_change=weights_only: the 2-rank weights, a fresh optimizer (Adam step 1 after one
    step), the step count and schedule go on; the log says what was not restored."""
    import shutil
    src = uninterrupted / 'checkpoints' / 'step_00000003'
    run = tmp_path / 'run'
    shutil.copytree(src, run / 'checkpoints' / 'step_00000003')
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, run, deepspeed={'zero_stage': 3, 'grad_accum_steps': 2},
                       checkpoint={'interval_steps': 1, 'keep_last': 5, 'on_world_size_change': 'weights_only'},
                       schedule={'total_steps': 4, 'warmup_steps': 2})
    out = run_procs(1, ['-m', 'pretrain', 'train', str(cfg)])
    assert '(weights_only)' in out and 'optimizer state (weights-only restart' in out
    assert _listing(run / 'checkpoints' / 'step_00000003') == _listing(src)  # no 'latest' written into it
    saved = consolidated(str(src), 3)
    after = consolidated(str(run / 'checkpoints' / 'step_00000004'), 4)
    params = [k for k in saved if 'running_' not in k and 'num_batches' not in k]
    assert 0 < max((after[k] - saved[k]).abs().max().item() for k in params) < 5e-3
    optim_file, = (run / 'checkpoints' / 'step_00000004' / 'global_step4').glob('*optim_states.pt')
    state = torch.load(optim_file, weights_only=False)['optimizer_state_dict']['optimizer_state_dict']['state']
    assert {float(v['step']) for v in state.values()} == {1.0}



@pytest.mark.slow
def test_optimizer_and_parameter_offload_train_and_resume(shards, tmp_path):
    """ZeRO-3 with the optimizer (DeepSpeedCPUAdam) and the parameters offloaded to host memory: trains, saves,
    and a resumed run continues from the offloaded optimizer state (2 + 2 steps == 4 steps).

    Not bitwise: DeepSpeedCPUAdam's C++ side keeps beta**t in float32, multiplying once per step, and after a
    load recomputes it with pow(beta, t) (DeepSpeed's cpu_adam.h IncrementStep), which rounds differently: the
    first update after the resume differs in the bias correction's last bits (~1e-5 relative), and one more step
    spreads that to ~1e-4 on the tiny model's most sensitive weights. A lost optimizer state (Adam restarting at
    step 1) would change every update by about the lr (1e-3), far outside the tolerance below."""
    common = dict(deepspeed={'zero_stage': 3, 'offload_optimizer': 'cpu', 'offload_param': 'cpu'},
                  schedule={'total_steps': 4, 'warmup_steps': 1}, checkpoint={'interval_steps': 2, 'keep_last': 5},
                  ema={'enabled': False}, loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0})
    straight = stage_config(tmp_path / 'a.yaml', shards, tmp_path / 'a', **common)
    run_procs(1, ['-m', 'pretrain', 'train', str(straight)], timeout=600)
    split = stage_config(tmp_path / 'b.yaml', shards, tmp_path / 'b', **common)
    run_procs(1, ['-m', 'pretrain', 'train', str(split), 'run.stop_after_steps=2'], timeout=600)
    out = run_procs(1, ['-m', 'pretrain', 'train', str(split)], timeout=600)
    assert 'resumed from' in out and '(exact)' in out
    a = consolidated(str(tmp_path / 'a' / 'checkpoints' / 'step_00000004'), 4)
    b = consolidated(str(tmp_path / 'b' / 'checkpoints' / 'step_00000004'), 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=3e-4, msg=lambda m, k=k: f'{k}: {m}')
    for run in ('a', 'b'):  # the offloaded Adam state was saved and restored: 4 steps counted in both runs
        optim_file, = (tmp_path / run / 'checkpoints' / 'step_00000004' / 'global_step4').glob('*optim_states.pt')
        state = torch.load(optim_file, weights_only=False)['optimizer_state_dict']['optimizer_state_dict']['state']
        assert {int(v['step']) for v in state.values()} == {4}, run
    torch.testing.assert_close(losses(tmp_path / 'a'), losses(tmp_path / 'b'), rtol=1e-4, atol=0)
    start = consolidated(str(tmp_path / 'a' / 'checkpoints' / 'step_00000002'), 2)
    assert any(not torch.equal(a[k], start[k]) for k in a), 'the offloaded optimizer did not update the weights'



@pytest.mark.slow
@pytest.mark.dist
def test_requeue_signal_saves_on_every_rank_and_the_rerun_resumes(shards, tmp_path):
    """`python -m pretrain train` on 2 ranks: USR2 to one rank makes both save at the same step boundary and exit
    with 75 (outside Slurm nothing is requeued); running the same command again resumes there and completes."""
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', data={'val': []},
                       schedule={'total_steps': 60, 'warmup_steps': 1}, checkpoint={'interval_steps': 1000},
                       loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0}, ema={'enabled': False})
    proc = subprocess.Popen(_torchrun(2, ['-m', 'pretrain', 'train', str(cfg)]), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / 'run' / 'metrics.jsonl'
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and sum(1 for _ in metrics.open()) >= 3):
            assert time.time() < deadline and proc.poll() is None, 'the run did not reach step 3'
            time.sleep(0.2)
        workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers  # torchrun's two rank processes
        os.kill(int(workers[-1]), signal.SIGUSR2)  # one rank only
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and 'preempted at step' in out, out[-3000:]
    committed = [p for p in (tmp_path / 'run' / 'checkpoints').iterdir() if (p / 'COMPLETE').is_file()]
    assert len(committed) == 1
    saved_at = int(committed[0].name.split('_')[1])
    assert 3 <= saved_at < 60
    again = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)], timeout=600)
    assert f'resumed from {committed[0]} at step {saved_at} (exact)' in again
    assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['step'] == 60


if __name__ == '__main__':
    if sys.argv[1] == 'parity':
        _parity_worker(sys.argv[2], [int(s) for s in sys.argv[3].split(',')], sys.argv[4], float(sys.argv[5]))
    elif sys.argv[1] == 'm3i_parity':
        _m3i_parity_worker(sys.argv[2])
    elif sys.argv[1] == 'bn':
        _bn_worker(sys.argv[2])
    elif sys.argv[1] == 'stream':
        _stream_worker(sys.argv[2])
    elif sys.argv[1] == 'nonfinite':
        _nonfinite_grad_worker(sys.argv[2], [int(s) for s in sys.argv[3].split(',')], sys.argv[4])
    from tests.dist_helpers import leave_worker
    leave_worker()
