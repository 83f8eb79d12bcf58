"""How long ``ds_to_universal`` takes to convert a ZeRO-3 checkpoint (a resume at another world size), by model size,
and what that predicts for InternImage-H.

    .venv/bin/python benchmarks/universal_conversion.py --models internimage_t internimage_s internimage_b

For each model: 2 CPU ranks (torchrun, gloo) build it, take one fp32 ZeRO-3 AdamW step on a batch of 2 at 32 px and
save a DeepSpeed checkpoint (fp32: the model's BatchNorm does not run in bf16 without autocast; 16 bytes a parameter
instead of bf16's 14, so the line below slightly overstates H). The conversion then runs as
``CheckpointManager.prepare_universal`` runs it (same command line), once with 1 extract / 1 merge worker and once
with 2 / 2, each timed in wall-clock seconds. Finally a least-squares line through (saved GiB, seconds) is evaluated
at InternImage-H's saved size, from its parameter count on the meta device (bf16 weights + fp32 master + 2 Adam
moments = 14 bytes per parameter), as a prediction: H itself (1.08B parameters, ~14 GiB saved) does not fit this
machine's memory twice over.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_PARAM = 2 + 4 + 4 + 4  # bf16 module weights, fp32 master, Adam exp_avg and exp_avg_sq


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def _worker(name: str, out: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from pretrain.models import create_backbone

    deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=1000)
    config = {'train_micro_batch_size_per_gpu': 2, 'gradient_accumulation_steps': 1,
              'zero_optimization': {'stage': 3},
              'optimizer': {'type': 'AdamW', 'params': {'lr': 1e-4, 'torch_adam': True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.randn(2, 3, 32, 32)  # BatchNorm in the head needs 2 values
    loss = engine(x).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag='global_step1', save_latest=False)
    dist.barrier()
    if rank == 0:
        params = sum(p.ds_numel for p in engine.module.parameters())
        Path(out, 'params.json').write_text(json.dumps({'params': params}))
    dist.barrier()
    dist.destroy_process_group()


def _convert(src: Path, workers: int) -> float:
    out = src.parent / f'universal_{workers}'
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, '-m', 'deepspeed.checkpoint.ds_to_universal', '--input_folder', str(src),
           '--output_folder', str(out), '--num_extract_workers', str(workers), '--num_merge_workers', str(workers),
           '--inject_missing_state']
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'DS_ACCELERATOR': 'cpu'})
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f'ds_to_universal failed: {res.stderr[-2000:]}')
    shutil.rmtree(out)
    return seconds


def _meta_params(name: str) -> int:
    import torch

    from pretrain.models import create_backbone

    with torch.device('meta'):
        model = create_backbone(name, num_classes=1000)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['internimage_t', 'internimage_s', 'internimage_b'])
    p.add_argument('--predict', default='internimage_h')
    p.add_argument('--worker', nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    import torch

    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DS_ACCELERATOR': 'cpu', 'PYTHONPATH': str(REPO)}
    rows = []
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, 2 ranks, ZeRO-3 fp32, ds_to_universal subprocess')
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix='universal_bench_') as tmp:
            save = Path(tmp) / 'save'
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                   str(29500 + os.getpid() % 1000), __file__, '--worker', name, str(save)]
            subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
            params = json.loads((save / 'params.json').read_text())['params']
            src = save / 'global_step1'
            row = {'model': name, 'params': params, 'saved_bytes': _folder_bytes(src),
                   'seconds_1_worker': _convert(src, 1), 'seconds_2_workers': _convert(src, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print('| model | parameters (M) | saved (MiB) | 1 worker (s) | 2 workers (s) | s per GiB (1 worker) |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        gib = r['saved_bytes'] / 2 ** 30
        print(f'| {r["model"]} | {r["params"] / 1e6:.1f} | {r["saved_bytes"] / 2 ** 20:.0f} | '
              f'{r["seconds_1_worker"]:.1f} | {r["seconds_2_workers"]:.1f} | {r["seconds_1_worker"] / gib:.1f} |')
    if args.predict and len(rows) >= 2:
        xs = [r['saved_bytes'] / 2 ** 30 for r in rows]
        for key in ('seconds_1_worker', 'seconds_2_workers'):
            ys = [r[key] for r in rows]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            params = _meta_params(args.predict)
            gib = params * BYTES_PER_PARAM / 2 ** 30
            print(f'{args.predict}: {params / 1e6:.0f}M parameters, ~{gib:.1f} GiB saved -> predicted '
                  f'{my + slope * (gib - mx):.0f} s with {key.split("_", 1)[1].replace("_", " ")} '
                  f'({slope:.1f} s per GiB, intercept {my - slope * mx:.1f} s)')


if __name__ == '__main__':
    main()
