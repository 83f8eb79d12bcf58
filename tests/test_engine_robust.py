"""Issue 19 §0 and §1 on real DeepSpeed (2 gloo ranks, CPU) and real shards: no hang at epoch boundaries, a stuck
rank ends in minutes with its stacks in the log, and skipped corrupt samples never leave a short training batch.

The model is the tiny InternImage of tests/test_engine.py on 32 px images.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pretrain.common.dist import free_port
from tests.test_engine import REPO, _env, run_procs, stage_config

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _rows(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / 'metrics.jsonl').read_text().splitlines()) if r['split'] == split]


def _write_shards(dst: Path, samples: list[tuple[str, dict]], per_shard: int, corrupt_in_shard: int = -1,
                  corrupt: int = 0) -> str:
    """``samples`` as shards of ``per_shard`` (no manifest: the loader counts the tar headers), with ``corrupt``
    undecodable JPEGs added to shard ``corrupt_in_shard``; returns the brace pattern."""
    from tests.data_helpers import write_tar

    dst.mkdir(parents=True, exist_ok=True)
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for i, shard in enumerate(shards):
        if i == corrupt_in_shard:
            bad = {**shard[0][1], 'jpg': b'\xff\xd8\xff\xe0 this is not a JPEG'}
            shard = shard[:2] + [(f'corrupt{j}', dict(bad)) for j in range(corrupt)] + shard[2:]
        write_tar(str(dst / f'part-{i:06d}.tar'), shard)
    return str(dst / f'part-{{000000..{len(shards) - 1:06d}}}.tar')


def _labelled(real_data: Path, tmp: Path, count: int) -> list[tuple[str, dict]]:
    """The first ``count`` real ImageNet photos (64 px) as labelled samples (jpg, cls)."""
    from tests.data_helpers import read_tar, write_photo_shards

    write_photo_shards(real_data, tmp, count=count, per_shard=count)
    return [(key, {'jpg': f['jpg'], 'cls': f['cls']}) for key, f in read_tar(str(tmp / 'in1k-000000.tar')).items()]


# ---- §0: many epoch boundaries with forkserver workers ---------------------------------------------------------

def test_forty_epoch_boundaries_on_two_ranks_with_two_workers_each(real_data, tmp_path):
    """40 epochs of one optimizer step each: every epoch starts 2 fresh loader workers on each rank (160 worker
    starts) while gloo and DeepSpeed threads run; with fork this could deadlock a worker (issue 19 §0)."""
    urls = _write_shards(tmp_path / 'shards', _labelled(real_data, tmp_path / 'photos', 8), per_shard=2)
    cfg = stage_config(tmp_path / 'c.yaml', urls, tmp_path / 'out',
                       data={'num_workers': 2, 'val': []},
                       loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
                       deepspeed={'zero_stage': 1, 'micro_batch_size': 2, 'grad_accum_steps': 2},
                       schedule={'total_steps': None, 'warmup_steps': None, 'epochs': 40, 'warmup_epochs': 1},
                       ema={'enabled': False},
                       checkpoint={'interval_steps': 1000, 'save_at_end': False},
                       logging={'interval_steps': 10, 'tensorboard': False, 'progress': False},
                       run={'watchdog_min': 2.0, 'collective_timeout_min': 3.0})
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg)], timeout=900)
    summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    assert summary['step'] == 40
    assert _rows(tmp_path / 'out', 'train')[-1]['epoch'] == 39  # 39 rollovers, the 40th pass ended the run


# ---- §0: a stuck rank ------------------------------------------------------------------------------------------

_STUCK_RANK = textwrap.dedent('''
    """python -m pretrain train, with rank STALL_RANK stuck for ever at its STALL_AT-th micro-batch (a real hang)."""
    import os, sys, time
    from pretrain.engine import data

    if os.environ['RANK'] == os.environ['STALL_RANK']:
        next_batch, calls = data.BatchStream.next_batch, [0]

        def stuck_in_next_batch(self):
            calls[0] += 1
            while calls[0] == int(os.environ['STALL_AT']):
                time.sleep(1)
            return next_batch(self)

        data.BatchStream.next_batch = stuck_in_next_batch
    from pretrain.engine.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_a_stuck_rank_dumps_its_stacks_and_the_other_times_out_both_exit_75(real_data, tmp_path):
    """Rank 1 hangs at its 5th micro-batch. Rank 0 (watchdog off) waits in the data all-reduce until the collective
    timeout (30 s), dumps its stacks and leaves with 75; rank 1's watchdog (60 s without a micro-batch) dumps the
    stuck stack and leaves with 75. Nothing waits for ever, and no loader worker outlives its rank (the pipes close)."""
    urls = _write_shards(tmp_path / 'shards', _labelled(real_data, tmp_path / 'photos', 16), per_shard=4)
    cfg = stage_config(tmp_path / 'c.yaml', urls, tmp_path / 'out',
                       data={'num_workers': 1, 'val': []}, loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
                       deepspeed={'zero_stage': 1, 'micro_batch_size': 2},
                       schedule={'total_steps': 8, 'warmup_steps': 1},
                       checkpoint={'interval_steps': 1000, 'save_at_end': False},
                       logging={'interval_steps': 1, 'tensorboard': False, 'progress': False})
    port = free_port()
    per_rank = {0: ['run.watchdog_min=0', 'run.collective_timeout_min=0.5'], 1: ['run.watchdog_min=1']}
    procs = {}
    for rank in (0, 1):
        env = {**_env(), 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
               'MASTER_PORT': str(port), 'STALL_RANK': '1', 'STALL_AT': '5'}
        procs[rank] = subprocess.Popen([sys.executable, '-c', _STUCK_RANK, str(cfg), *per_rank[rank]],
                                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outs = {rank: p.communicate(timeout=400) for rank, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    codes = {rank: p.returncode for rank, p in procs.items()}
    assert codes == {0: 75, 1: 75}, f'{codes}\n--- rank 0\n{outs[0][1][-4000:]}\n--- rank 1\n{outs[1][1][-4000:]}'
    err0, err1 = outs[0][1], outs[1][1]
    assert 'a collective timed out after run.collective_timeout_min=0.5 min' in err0
    assert 'in all_reduce' in err0 and 'in next_batch' in err0  # rank 0's stack: waiting in the data all-reduce
    assert '[watchdog rank 1] no progress for' in err1 and 'run.watchdog_min=1)' in err1
    assert 'in stuck_in_next_batch' in err1  # rank 1's stack: where it hangs
    dump = (tmp_path / 'out' / 'watchdog' / 'rank1.txt').read_text()
    assert 'in stuck_in_next_batch' in dump and 'in train_step' in dump


# ---- §1: skipped corrupt samples in epoch mode, Mixup and contrastive ------------------------------------------

def _train_epochs_over_corrupt_shards(tmp_path: Path, urls: str, micro_batch: int, **sections) -> list[dict]:
    """4 epochs on 2 ranks x 2 workers; checks the run finished with full micro-batches only and counted the skips.
    Returns the train metric rows."""
    cfg = stage_config(tmp_path / 'c.yaml', urls, tmp_path / 'out',
                       data={'num_workers': 2, 'val': [], 'mode': 'epoch'},
                       deepspeed={'zero_stage': 1, 'micro_batch_size': micro_batch},
                       schedule={'total_steps': None, 'warmup_steps': None, 'epochs': 4, 'warmup_epochs': 1},
                       checkpoint={'interval_steps': 1000, 'save_at_end': False},
                       logging={'interval_steps': 1, 'tensorboard': False, 'progress': False}, **sections)
    out = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)], timeout=900)
    summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    rows = _rows(tmp_path / 'out', 'train')
    assert summary['step'] == rows[-1]['step'] and rows[-1]['epoch'] >= 3
    assert 'skipped sample (decode_error' in out
    assert max(sum(r['data_skips'].values()) for r in rows) >= 1
    assert summary['samples_seen'] == summary['step'] * micro_batch * 2  # every micro-batch full, on both ranks
    return rows


def test_epoch_mode_with_corrupt_samples_and_mixup_on_two_ranks(real_data, tmp_path):
    """3 corrupt JPEGs in one of 4 shards; Mixup/CutMix needs an even micro-batch on every rank (issue 19 §1: rank 0
    died with timm's "Batch size should be even")."""
    photos = _labelled(real_data, tmp_path / 'photos', 32)
    urls = _write_shards(tmp_path / 'shards', photos, per_shard=8, corrupt_in_shard=1, corrupt=3)
    _train_epochs_over_corrupt_shards(tmp_path, urls, 4)  # stage_config's Mixup 0.8 / CutMix 1.0


def test_epoch_mode_with_corrupt_samples_and_the_contrastive_loss_on_two_ranks(real_data, tmp_path):
    """The same with image-text pairs and the contrastive loss, whose all_gather needs equal shapes on every rank."""
    from tests.data_helpers import CC12M_TAR, read_tar

    pairs = [(key, {'jpg': f['jpg'], 'txt': f['txt']}) for key, f in read_tar(CC12M_TAR).items()]
    urls = _write_shards(tmp_path / 'shards', pairs, per_shard=8, corrupt_in_shard=2, corrupt=3)
    rows = _train_epochs_over_corrupt_shards(
        tmp_path, urls, 3,
        objective={'kind': 'multi', 'supervised': {'weight': 0.0}, 'mim': {'weight': 0.0}, 'fcmae': {'weight': 0.0},
                   'contrastive': {'weight': 1.0, 'embed_dim': 32, 'text_width': 32, 'text_layers': 1,
                                   'text_heads': 2, 'context_length': 16}},
        loss={'label_smoothing': 0.0, 'mixup_alpha': 0.0, 'cutmix_alpha': 0.0})
    assert all('contrastive' in r['loss'] for r in rows)


_WRITER = """
import os
import sys
import time
from pretrain.common.dist import print_line
tag, how, folder, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def write(msg):
    if how == 'print':
        print(msg, file=sys.stderr, flush=True)
    else:
        print_line(msg)
open(os.path.join(folder, 'ready-' + tag), 'w').close()  # imports done
while len(os.listdir(folder)) < 2:  # both start together, as ranks do after a collective
    time.sleep(0.001)
for i in range(n):
    write(f'error: rank {tag} line {i:03d} ' + tag * 1500)
    if i % 100 == 99:  # give up the core now and then: on a busy machine one writer can otherwise finish first
        time.sleep(0.001)
"""


def _two_writers(how: str, folder: Path, n: int = 2000) -> tuple[list[str], set[str]]:
    """Two writer processes (``how``: 'print_line' or 'print') on one stderr pipe; they start writing once both
    have imported (a ready file each in the empty ``folder``). Returns the lines read and the lines written."""
    script = ' & '.join(f'{sys.executable} -c "$CODE" {t} {how} {folder} {n}' for t in 'ab') + ' & wait'
    res = subprocess.run(['sh', '-c', script], cwd=REPO, env={**_env(), 'CODE': _WRITER},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr.splitlines(), {f'error: rank {t} line {i:03d} ' + t * 1500 for t in 'ab' for i in range(n)}


def test_error_lines_of_two_ranks_on_one_pipe_stay_whole(tmp_path):
    """Two processes start together and write 2,000 lines of 1.5 KB each to one stderr pipe: with ``print_line``
    every line arrives whole. ``print(..., flush=True)`` writes the text and the newline as two system calls; CI saw
    two ranks' checkpoint-save errors glued into one line, and this writer with ``print`` spoils 800-2,200 of the
    4,000 lines on this idle machine (about 50 while CI's tests ran beside it). The writers must have overlapped
    (the two ranks' lines alternate), or the test proves nothing: each sleeps 1 ms every 100 lines, since on a busy
    CI machine one writer once finished nearly all its lines before the other ran (3 alternations); with three busy
    loops beside them here, that gives 56-61 alternations, and ``print`` still spoils 38-124 lines."""
    lines, want = _two_writers('print_line', tmp_path)
    assert len(lines) == 4000 and set(lines) == want, [ln[:40] for ln in lines if ln not in want][:5]
    switches = sum(a[12] != b[12] for a, b in zip(lines, lines[1:]))  # 'error: rank X': X at index 12
    assert switches >= 10, f'the two writers did not overlap ({switches} alternations)'
