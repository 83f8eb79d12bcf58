"""``make gpu-check``: the GPU acceptance run in one command (issue 14; docs/GPU.md says how to run it).

    python benchmarks/gpu_check.py [--out DIR] [--total-s 450]

On a CUDA machine, in this order, each part under its own time budget (a part that does not fit is reported
"not run", a part that runs out of time "timeout"; the report is written whatever happens):

1. ``setup``: when ``import deepspeed`` fails and ``.whl/`` holds wheels, installs them with pip (no index, no deps)
   into ``/tmp/site`` and puts that on ``PYTHONPATH`` for every later part; links ``.whl/data/real`` to
   ``../shared/data/real`` when the latter is missing (tests/conftest.py reads the real data there); starts building
   the DCNv4 anchor (``.whl/anchors/DCNv4-*.tar.gz`` or ``../shared/anchors/``) in the background.
2. ``build``: the DCNv3 CUDA extension for this GPU's architecture only (``DCNV3_CUDA_ARCH_LIST`` from the device
   capability, ``MAX_JOBS``), via ``python -m pretrain.ops build --cuda``; later parts load it from the cache.
3. ``tests``: ``pytest -m gpu -rA`` over the DCNv3 CUDA tests, the InternImage kernel-vs-reference model test and
   tests/test_engine_gpu.py (the ZeRO-3 bf16 resume regression first); log and JUnit XML kept.
4. ``kernel``: ``benchmarks/dcnv3.py --device cuda``: our chunked kernel, DCNv4 (when its background build
   finished), the legacy kernel and the reference at the training shapes, fp32 and bf16, rows kept as they come.
5. ``throughput``: benchmarks/gpu_train.py, InternImage-T/-B vs ConvNeXt-T/-B, batch 64 then 128, 224 px, bf16,
   AdamW, as many configurations as the budget allows (the rest reported not run).
6. ``h1gpu`` (not in the default ``--parts``: it needs more than the default 450 s): benchmarks/gpu_h.py,
   InternImage-H's M3I stage (configs/stage/internimage_h_m3i.yaml: ZeRO-3 bf16, activation checkpointing, 224 px)
   on this one GPU: micro-batches growing until one runs out of memory, images/s,
   peak memory against ``python -m pretrain plan``'s prediction (computed on the CPU in the background from setup on).
7. ``compile`` (not in the default ``--parts``: a cold inductor compile takes minutes): benchmarks/compile.py
   ``--device cuda --precision bf16``: InternImage-T and ConvNeXt-T training steps at batch 64, eager against
   ``nn.Module.compile()``, and the cold compile time (inductor with this host's cores as compile workers).
8. ``dcnv4``: whether the background DCNv4 build finished and imports.

``--parts`` runs a subset (default build,tests,kernel,throughput; the others are reported "not selected" and reserve
no time); ``--tests`` replaces the
pytest selection (comma-separated node ids), e.g. only ``tests/test_dcnv3_cuda.py`` after a kernel change.

Without CUDA it rehearses: compiles the CUDA sources with nvcc for sm_90 (``GPU_CHECK_SKIP_NVCC=1`` skips this
slow step), collects every test it would run (``pytest --collect-only -m gpu``), builds the benchmark models on the
meta device, checks the benchmark scripts import, and says that it needs a GPU (exit 0 when the rehearsal passed).

Output: ``gpu-report.json``, ``gpu-report.md``, ``pytest.log``, ``pytest-junit.xml`` and ``logs.txt`` (every other
part's output) in ``$OUT`` when set (the device tool brings back at most 8 files), else ``runs/gpu-check/<UTC time>``.
Exit status: 0 when every part that ran passed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / '.whl'
SITE = Path('/tmp/site')
DCNV4_SITE = Path('/tmp/dcnv4')
SCRATCH = Path('/tmp/gpu-check')  # intermediate files, merged into the report ($OUT brings back 8 files at most)
ANCHOR = 'DCNv4-1.0.0.post2.tar.gz'
# Seconds each part needs at least; a part gets whatever the total leaves after the later parts' minimums.
MIN_BUDGET_S = {'setup': 60, 'build': 120, 'tests': 120, 'kernel': 40, 'throughput': 50, 'h1gpu': 180,
                'compile': 240}
# What fits the default 450 s. h1gpu (a 1.2B-parameter Trainer: ~30 s to build, warm-up steps of 20-30 s) needs
# more: --parts build,h1gpu, or every part with --total-s 900; compile (two cold inductor compiles; 435 s and 140 s
# on one CPU core here) runs after the build alone: --parts build,compile --total-s 600.
DEFAULT_PARTS = ('build', 'tests', 'kernel', 'throughput')
H_CONFIG = 'configs/stage/internimage_h_m3i.yaml'
GPU_TESTS = [  # the ZeRO-3 misaligned-address regression first: it is the headline claim
    'tests/test_engine_gpu.py::test_supervised_bf16_trains_and_resumes_on_one_gpu[3]',
    'tests/test_dcnv3_cuda.py',
    'tests/test_models_internimage.py::test_cuda_kernel_model_matches_reference_model',
    'tests/test_engine_gpu.py::test_m3i_zero3_bf16_trains_on_one_gpu',
    'tests/test_engine_gpu.py::test_supervised_bf16_trains_and_resumes_on_one_gpu[2]',
    'tests/test_engine_gpu.py::test_fp16_loss_scale_skips_do_not_stop_the_run',
    'tests/test_engine_gpu.py::test_fp16_zero2_trains_on_one_gpu',
    'tests/test_engine_gpu.py::test_zero3_on_two_gpus_matches_one_gpu',  # skipped on one GPU
]


class Check:
    """The report being built: one entry per part, the log, the time left."""

    def __init__(self, out: Path, total_s: float, parts: list[str] | None = None):
        self.out, self.deadline, self.t_start = out, time.monotonic() + total_s, time.monotonic()
        self.selected = list(parts or MIN_BUDGET_S)
        self.models = 'internimage_t,convnext_tiny,internimage_b,convnext_base'  # throughput part, in this order
        self.block_threads = ''  # kernel part: also time ours at these threads per block (launch-table tuning)
        self.parts: dict[str, dict] = {}
        self.background: list[subprocess.Popen] = []  # killed at the end if still running (main's finally)
        self.log = (out / 'logs.txt').open('a')
        self.env = dict(os.environ, PYTHONUNBUFFERED='1')

    def budget(self, part: str) -> float:
        """Seconds ``part`` may use: the time left minus the minimum budgets of the parts after it."""
        later = list(MIN_BUDGET_S)[list(MIN_BUDGET_S).index(part) + 1:] if part in MIN_BUDGET_S else []
        return self.deadline - time.monotonic() - sum(MIN_BUDGET_S[p] for p in later if p in self.selected)

    def wants(self, part: str) -> bool:
        """Whether ``part`` was selected (``--parts``); one that was not is reported so."""
        if part not in self.selected:
            self.parts[part] = {'status': 'not run', 'reason': 'not selected (--parts)'}
        return part in self.selected

    def run(self, part: str, cmd: list[str], budget_s: float, log: Path | None = None, **extra) -> dict:
        """Runs ``cmd`` in its own process group (killed whole on timeout); records status, seconds and output tail."""
        return self.finish(part, self.start(part, cmd, budget_s, log), **extra)

    def start(self, part: str, cmd: list[str], budget_s: float, log: Path | None = None) -> tuple | None:
        """Starts ``cmd`` for ``part``, which may use ``budget_s`` seconds from now; None when that is too little."""
        if budget_s < 5:
            self.parts[part] = {'status': 'not run', 'reason': f'{budget_s:.0f} s left of the total budget'}
            return None
        sink = log.open('w') if log else self.log
        sink.write(f'\n===== {part}: {" ".join(cmd)} (budget {budget_s:.0f} s)\n')
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return proc, time.monotonic(), budget_s, sink, log

    def finish(self, part: str, started: tuple | None, **extra) -> dict:
        """Waits for what :meth:`start` started until its budget is spent (then kills its process group)."""
        if started is None:
            self.parts[part].update(extra)
            return self.parts[part]
        proc, t0, budget_s, sink, log = started
        try:
            rc = proc.wait(timeout=max(t0 + budget_s - time.monotonic(), 0.1))
            status = 'passed' if rc == 0 else 'failed'
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest's torchrun ranks too
            proc.wait()
            rc, status = None, 'timeout'
        seconds = time.monotonic() - t0
        if log:
            sink.close()
        text = (log or self.out / 'logs.txt').read_text(errors='replace')
        self.parts[part] = {'status': status, 'rc': rc, 'seconds': round(seconds, 1), 'budget_s': round(budget_s),
                            'tail': text[-(12000 if log else 3000):], **extra}  # pytest's -rA summary is long
        print(f'[gpu-check] {part}: {status} in {seconds:.0f} s (budget {budget_s:.0f} s)', flush=True)
        return self.parts[part]

    def py(self, *args: str) -> list[str]:
        return [sys.executable, *args]


def take_rows(path: Path, part: dict, key: str | None = None) -> None:
    """Move a benchmark's JSON rows (``key`` of its object, or the whole file) into its part of the report and
    delete the file: the rows live in the report, and a later run never reports a killed earlier run's rows."""
    if path.is_file():
        rows = json.loads(path.read_text())
        part['rows'] = rows[key] if key else rows
        path.unlink()


def capture(cmd: list[str], env: dict | None = None, timeout: float = 60) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        return (res.stdout + res.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f'{type(exc).__name__}: {exc}'


def setup(check: Check, cuda: bool) -> subprocess.Popen | None:
    """Wheels, real data, and the DCNv4 build started in the background (returned, or None)."""
    info: dict = {}
    wheels = sorted(glob.glob(str(CARRY / '*.whl')))
    names = [Path(w).name.split('-')[0].lower() for w in wheels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        info['wheel_duplicates'] = dupes  # pip stops on two versions of one package
    has_ds = subprocess.run(check.py('-c', 'import deepspeed, webdataset, open_clip, submitit, torchdata'),
                            capture_output=True, env=check.env).returncode == 0
    info['wheels'] = [Path(w).name for w in wheels]
    status = 'passed'
    if has_ds:
        info['wheel_install'] = 'not needed: deepspeed, webdataset, open_clip, submitit and torchdata import'
    elif not wheels:
        info['wheel_install'] = 'needed, but .whl/ holds no wheels (run `make gpu-wheels` and carry .whl)'
        status = 'failed'
    else:
        res = subprocess.run(check.py('-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                                      '--no-cache-dir', '--upgrade', '--target', str(SITE), *wheels),
                             capture_output=True, text=True)
        info['wheel_install'] = f'pip rc {res.returncode}: {(res.stdout + res.stderr)[-1500:]}'
        check.env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(SITE), check.env.get('PYTHONPATH')]))
        # Subprocesses that set their own PYTHONPATH (the tests' torchrun ranks) still see the wheels through a .pth.
        pth = capture(check.py('-c', 'import site; print(site.getsitepackages()[0])')).splitlines()[-1]
        try:
            (Path(pth) / 'gpu_check_site.pth').write_text(f'{SITE}\n')
            info['pth'] = f'{pth}/gpu_check_site.pth -> {SITE}'
        except OSError as exc:
            info['pth'] = f'no .pth ({exc}); only PYTHONPATH carries {SITE}'
        status = 'passed' if res.returncode == 0 else 'failed'
    info['imports'] = capture(check.py('-c', 'import deepspeed, webdataset, open_clip, submitit, torchdata, '
                                             'simplejpeg; print("deepspeed", deepspeed.__version__)'), check.env)
    real = REPO.parent / 'shared' / 'data' / 'real'
    if not real.is_dir() and (CARRY / 'data' / 'real').is_dir():
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            real.symlink_to(CARRY / 'data' / 'real')
            info['real_data'] = f'linked {real} -> {CARRY / "data" / "real"}'
        except OSError as exc:
            info['real_data'] = f'cannot link {real}: {exc}'
    else:
        info['real_data'] = f'{real}: {"present" if real.is_dir() else "MISSING (the engine tests will fail)"}'
    dcnv4 = None
    anchors = [p for p in (CARRY / 'anchors' / ANCHOR, REPO.parent / 'shared' / 'anchors' / ANCHOR) if p.is_file()]
    if not anchors:
        info['dcnv4'] = f'{ANCHOR} not carried (.whl/anchors/)'
    elif 'kernel' not in check.selected:
        info['dcnv4'] = 'not built: only the kernel part uses it'
    elif cuda:
        # Niced: it compiles beside our build (one nvcc process: the cores are idle) and then beside the timed parts,
        # which must keep the host (a host-bound training step slows with a busy host); 'concurrent' says when.
        with (SCRATCH / 'dcnv4-build.log').open('w') as log:  # the child keeps its own descriptor
            dcnv4 = subprocess.Popen(['nice', '-n', '19', *check.py('-m', 'pip', 'install', '--no-index', '--no-deps',
                                                                    '--no-build-isolation', '--target',
                                                                    str(DCNV4_SITE), str(anchors[0]))],
                                     cwd=REPO, env=dict(check.env, MAX_JOBS='8'), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        check.background.append(dcnv4)
        info['dcnv4'] = f'building {anchors[0]} in the background'
    else:
        info['dcnv4'] = f'{anchors[0]} present; built only on a CUDA machine'
    check.parts['setup'] = {'status': status, **info}
    print(f'[gpu-check] setup: {status}; {info["imports"].splitlines()[-1] if info["imports"] else ""}', flush=True)
    return dcnv4


def gpu_facts(check: Check) -> dict:
    code = ('import json, torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; '
            'print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, '
            '"gpu": p.name if p else None, "capability": f"{p.major}.{p.minor}" if p else None, '
            '"memory_gib": round(p.total_memory / 2**30, 1) if p else None}))')
    facts = json.loads(capture(check.py('-c', code), check.env).splitlines()[-1])
    facts.update(python=platform.python_version(), host=platform.node(),
                 nvidia_smi=capture(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                                     '--format=csv,noheader']),
                 nvcc=capture(['nvcc', '--version']).splitlines()[-1:])
    return facts


def build_both_cmd() -> list[str]:
    """The CPU and CUDA DCNv3 extensions built at once in two processes (one .cpp and one .cu: two compilers, not
    one after the other as ``python -m pretrain.ops build --cuda`` does); fails when either fails."""
    cuda = ("import sys; from pretrain.ops import build; m = build.load_cuda(force=True); "
            "print('cuda:', m.__file__ if m else build.failure('cuda')); sys.exit(m is None)")
    py = sys.executable
    return ['bash', '-c', f'{py} -m pretrain.ops build & cpu=$!; {py} -c "{cuda}"; r=$?; wait $cpu; exit $((r | $?))']


def start_h_plan(check: Check, facts: dict) -> subprocess.Popen | None:
    """``python -m pretrain plan`` for InternImage-H's M3I stage at 1 rank on this GPU's memory, in the background on
    the CPU (it builds the model and measures activations there), for the h1gpu part to compare against."""
    if 'h1gpu' not in check.selected:
        return None
    plan_json = SCRATCH / 'h-plan.json'
    plan_json.unlink(missing_ok=True)
    with plan_json.open('w') as out, (SCRATCH / 'h-plan.log').open('w') as err:  # the child keeps its descriptors
        proc = subprocess.Popen(['nice', '-n', '19', *check.py('-m', 'pretrain', 'plan', H_CONFIG, '--world-size', '1',
                                                               '--gpu-mem', str(facts.get('memory_gib') or 80),
                                                               '--json')],
                                cwd=REPO, env=dict(check.env, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='2'),
                                stdout=out, stderr=err, start_new_session=True)
    check.background.append(proc)
    return proc


def run_gpu(check: Check, facts: dict, build: tuple | None, dcnv4: subprocess.Popen | None,
            h_plan: subprocess.Popen | None, tests: list[str]) -> None:
    if check.finish('build', build, arch=facts['capability'])['status'] == 'timeout':
        # A lock file left by the killed build: torch versions that lock with a baton file would wait on it forever.
        for lock in (SCRATCH / 'dcnv3-cache').rglob('lock'):
            lock.unlink(missing_ok=True)
    background = {'dcnv4 build': dcnv4, 'H plan (CPU)': h_plan}

    def concurrent() -> list[str]:
        """The niced background jobs still running as a timed part starts (reported beside its figures)."""
        return [k for k, proc in background.items() if proc is not None and proc.poll() is None]

    if check.wants('tests'):
        check.run('tests', check.py('-m', 'pytest', '-m', 'gpu', '-rA', '-p', 'no:cacheprovider',
                                    f'--junitxml={check.out / "pytest-junit.xml"}', *tests),
                  check.budget('tests'), log=check.out / 'pytest.log')
    if check.wants('kernel'):
        kernel_json = SCRATCH / 'dcnv3.json'
        kernel_json.unlink(missing_ok=True)
        budget = check.budget('kernel')  # ours, DCNv4, legacy, reference: each backend one process over every shape
        part = check.run('kernel', check.py('benchmarks/dcnv3.py', '--device', 'cuda', '--repeats', '20', '--json',
                                            str(kernel_json), '--dcnv4-site', str(DCNV4_SITE),
                                            '--block-threads', check.block_threads,
                                            '--backends', 'ours,legacy,reference,dcnv4',  # DCNv4 late: it builds
                                            '--budget-s', str(max(budget - 10, 1))), budget, concurrent=concurrent())
        take_rows(kernel_json, part)
    if check.wants('throughput'):
        train_json = SCRATCH / 'gpu_train.json'
        train_json.unlink(missing_ok=True)  # never report a killed earlier run's rows
        budget = check.budget('throughput')  # T pair first, then B, then batch 128; what does not fit is 'not run'
        part = check.run('throughput', check.py('benchmarks/gpu_train.py', '--models', check.models,
                                                '--batches', '64,128', '--json', str(train_json), '--profile',
                                                '--budget-s', str(max(budget - 45, 1))), budget,
                         concurrent=concurrent())
        take_rows(train_json, part)
    if check.wants('h1gpu'):
        plan_json, h_json = SCRATCH / 'h-plan.json', SCRATCH / 'gpu_h.json'
        h_json.unlink(missing_ok=True)
        plan_state = 'not started'
        if h_plan is not None:
            try:  # it started minutes ago; a plan still running after a short wait is left out, not waited for
                plan_state = f'rc {h_plan.wait(timeout=20)}'
            except subprocess.TimeoutExpired:
                os.killpg(h_plan.pid, signal.SIGKILL)
                h_plan.wait()
                plan_state = 'still running: killed, no prediction'
            plan_log = SCRATCH / 'h-plan.log'
            if plan_state not in ('rc 0', 'still running: killed, no prediction') and plan_log.is_file():
                plan_state += ': ' + plan_log.read_text(errors='replace')[-1500:]  # why the plan failed
        budget = check.budget('h1gpu')
        plan_ok = plan_json.is_file() and plan_json.stat().st_size > 0 and plan_state == 'rc 0'
        if plan_ok:
            try:
                plan_result = json.loads(plan_json.read_text())
            except json.JSONDecodeError as exc:  # anything else printed on stdout: no prediction, not a crash
                plan_ok, plan_state = False, f'rc 0, but {plan_json} is not JSON: {exc}'
        part = check.run('h1gpu', check.py('benchmarks/gpu_h.py', '--config', H_CONFIG, '--json', str(h_json),
                                           *(['--plan-json', str(plan_json)] if plan_ok else []),
                                           '--budget-s', str(max(budget - 30, 1))),
                         budget, plan=plan_state, concurrent=concurrent())
        if plan_ok:
            part['plan_result'] = plan_result
        take_rows(h_json, part)
    if check.wants('compile'):
        compile_json = SCRATCH / 'compile.json'
        compile_json.unlink(missing_ok=True)
        part = check.run('compile', check.py('benchmarks/compile.py', '--device', 'cuda', '--precision', 'bf16',
                                             '--batch', '64', '--steps', '5', '--threads', str(os.cpu_count() or 8),
                                             '--json-file', str(compile_json)),
                         check.budget('compile'), concurrent=concurrent())
        take_rows(compile_json, part, key='rows')
    if dcnv4 is None:
        check.parts['dcnv4'] = {'status': 'not run', 'reason': check.parts['setup'].get('dcnv4')}
    elif dcnv4.poll() is None:
        os.killpg(dcnv4.pid, signal.SIGKILL)
        check.parts['dcnv4'] = {'status': 'timeout', 'reason': 'the background build did not finish in time'}
    else:
        ok = dcnv4.returncode == 0
        env = dict(check.env, PYTHONPATH=os.pathsep.join([str(DCNV4_SITE), check.env.get('PYTHONPATH', '')]))
        check.parts['dcnv4'] = {'status': 'passed' if ok else 'failed', 'rc': dcnv4.returncode,
                                'import': capture(check.py('-c', 'import DCNv4; print(DCNv4.__file__)'), env)
                                if ok else None}
    log = SCRATCH / 'dcnv4-build.log'
    if log.is_file():
        check.log.write('\n===== dcnv4 build\n' + log.read_text(errors='replace')[-20000:])
        log.unlink()


def rehearse(check: Check, build: tuple | None, tests: list[str]) -> None:
    """The CPU rehearsal: nvcc for sm_90, test collection, benchmark imports and models on the meta device."""
    if build is not None:  # else the report already says why not (GPU_CHECK_SKIP_NVCC=1)
        check.finish('build', build, arch='9.0 (nvcc only, no device)')
    if check.wants('tests'):
        check.run('tests', check.py('-m', 'pytest', '--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider',
                                    *tests), check.budget('tests'), log=check.out / 'pytest.log', mode='collect-only')
    if check.wants('kernel'):
        check.run('kernel', check.py('-c', 'import sys; sys.argv = ["dcnv3"]; sys.path.insert(0, "benchmarks"); '
                                          'import dcnv3; assert {"T1", "H3"} <= set(dcnv3.GPU_SHAPES); '
                                          'from pretrain.ops import dcnv3_core, dcnv3_core_pytorch'),
                  check.budget('kernel'), mode='import only')
    if check.wants('throughput'):
        check.run('throughput', check.py('benchmarks/gpu_train.py', '--dry-run'), check.budget('throughput'),
                  mode='models built on the meta device')
    if check.wants('h1gpu'):
        check.run('h1gpu', check.py('benchmarks/gpu_h.py', '--config', H_CONFIG, '--dry-run'), check.budget('h1gpu'),
                  mode='config resolved, model built on the meta device')
    if check.wants('compile'):
        check.run('compile', check.py('benchmarks/compile.py', '--dry-run'), check.budget('compile'),
                  mode='models built on the meta device')
    check.parts['dcnv4'] = {'status': 'not run', 'reason': check.parts['setup'].get('dcnv4')}


def write_report(check: Check, facts: dict, cuda: bool) -> None:
    report = {'utc': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
              'mode': 'gpu' if cuda else 'rehearsal (no CUDA device: this run needs a GPU)',
              'seconds': round(time.monotonic() - check.t_start, 1), 'machine': facts, 'parts': check.parts}
    (check.out / 'gpu-report.json').write_text(json.dumps(report, indent=1, default=str))
    md = [f'# GPU check, {report["utc"]}', '', f'Mode: {report["mode"]}; {report["seconds"]} s in all.', '',
          f'Machine: {facts.get("gpu")} (capability {facts.get("capability")}), torch {facts.get("torch")}, '
          f'CUDA {facts.get("cuda")}, Python {facts.get("python")}; nvidia-smi: {facts.get("nvidia_smi")}', '',
          '| part | status | seconds | budget s | note |', '|---|---|---|---|---|']
    for name, p in check.parts.items():
        note = p.get('reason') or p.get('mode') or p.get('arch') or p.get('wheel_install', '')
        md.append(f'| {name} | {p["status"]} | {p.get("seconds", "")} | {p.get("budget_s", "")} | '
                  f'{str(note).splitlines()[0][:120] if note else ""} |')
    rows = check.parts.get('throughput', {}).get('rows')
    if rows:
        md += ['', '## Training throughput (bf16 autocast, fwd+bwd+AdamW, 224 px)', '',
               '| model | batch | images/s | step ms | counted GFLOP/step | MFU (counted) | peak GiB |',
               '|---|---|---|---|---|---|---|']
        for r in rows:
            if 'error' in r:
                md.append(f'| {r["model"]} | {r["batch"]} | {r["error"]} | | | | |')
            else:
                md.append(f'| {r["model"]} | {r["batch"]} | {r["images_per_s"]:.0f} | {r["median_step_ms"]:.1f} | '
                          f'{r["step_gflop_counted"]:.0f} | {r.get("mfu_counted", float("nan")):.1%} | '
                          f'{r["peak_mem_gib"]:.1f} |')
        ips = {(r['model'], r['batch']): r['images_per_s'] for r in rows if 'images_per_s' in r}
        for (model, batch), value in ips.items():
            base = ips.get((model.replace('internimage_t', 'convnext_tiny').replace('internimage_b', 'convnext_base'),
                            batch)) if model.startswith('internimage') else None
            if base:
                md.append(f'\n{model} / its ConvNeXt at batch {batch}: {value / base:.2f}x images/s (goal >= 0.8x)')
    rows = check.parts.get('kernel', {}).get('rows')
    if rows:
        sys.path.insert(0, str(REPO / 'benchmarks'))
        import dcnv3
        md += ['', '## DCNv3 kernel (benchmarks/dcnv3.py)', '', dcnv3.table(rows)]
    rows = check.parts.get('h1gpu', {}).get('rows')
    if rows:
        r0 = rows[0]
        md += ['', f'## InternImage-H on one GPU ({H_CONFIG}: {r0["objective"]}, ZeRO-{r0["zero_stage"]} '
                   f'{r0["precision"]}, checkpointing {r0["grad_checkpointing"]}, {r0["img_size"]} px)', '',
               f'{r0["params"] / 1e6:.0f}M parameters; Trainer built in {r0["trainer_build_s"]} s.', '',
               '| micro-batch | images/s | step ms | peak GiB allocated | peak GiB reserved | plan GiB '
               '| measured / plan |',
               '|---|---|---|---|---|---|---|']
        for r in rows:
            pred = f'{r["predicted_alloc_gib"]:.1f}' if r.get('predicted_alloc_gib') else ''
            if 'error' in r:
                md.append(f'| {r["batch"]} | {r["error"][:100]} | | | | {pred} | |')
            else:
                ratio = f'{r["measured_over_predicted"]:.2f}' if r.get('measured_over_predicted') else ''
                md.append(f'| {r["batch"]} | {r["images_per_s"]:.1f} | {r["step_ms"]:.0f} | {r["peak_mem_gib"]:.1f} | '
                          f'{r["peak_reserved_gib"]:.1f} | {pred} | {ratio} |')
    rows = check.parts.get('compile', {}).get('rows')
    if rows:
        md += ['', '## torch.compile against eager (benchmarks/compile.py, bf16 autocast, fwd+CE+bwd+AdamW, 224 px)',
               '', '| model | batch | eager median ms | compiled median ms | compiled / eager | cold compile s |',
               '|---|---|---|---|---|---|']
        md += [f'| {r["model"]} | {r["batch"]} | {r["median_s"]["eager"] * 1e3:.1f} | '
               f'{r["median_s"]["compiled"] * 1e3:.1f} | {r["ratio_median"]:.2f} | {r["compile_s"]:.0f} |'
               for r in rows]
    tests = check.parts.get('tests', {})
    if tests.get('tail'):
        summary = [ln for ln in tests['tail'].splitlines() if ln.startswith(('PASSED', 'FAILED', 'ERROR', 'SKIPPED'))
                   or ' passed' in ln or ' failed' in ln or ' collected' in ln]
        md += ['', '## pytest', '', '```', *summary[-40:], '```']
    (check.out / 'gpu-report.md').write_text('\n'.join(md) + '\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=None, help='default: $OUT, else runs/gpu-check/<UTC time>')
    parser.add_argument('--total-s', type=float, default=None,
                        help='wall-clock budget of the whole check (default $GPU_CHECK_TOTAL_S, else 450 s = 7.5 min '
                             'on a GPU and 1500 s for the rehearsal on a shared CPU machine)')
    parser.add_argument('--parts', default=','.join(DEFAULT_PARTS),
                        help='comma-separated subset of ' + ','.join(p for p in MIN_BUDGET_S if p != 'setup')
                        + ' (default: the parts that fit 450 s; h1gpu needs more, see MIN_BUDGET_S)')
    parser.add_argument('--tests', default=','.join(GPU_TESTS), help='pytest node ids, comma-separated')
    parser.add_argument('--models', default='internimage_t,convnext_tiny,internimage_b,convnext_base',
                        help='throughput part: the models, each batch size in turn (benchmarks/gpu_train.py)')
    parser.add_argument('--block-threads', default='', help="kernel part: also time 'ours' at these threads per "
                        'block, e.g. 64,128,256 (benchmarks/dcnv3.py --block-threads)')
    args = parser.parse_args(argv)
    parts = ['setup', *args.parts.split(',')]
    unknown = sorted(set(parts) - set(MIN_BUDGET_S))
    if unknown:
        parser.error(f'--parts: unknown {", ".join(unknown)} (known: {", ".join(MIN_BUDGET_S)})')
    tests = [t for t in args.tests.split(',') if t]
    if not tests and 'tests' in parts:  # pytest with no node ids would run every gpu test under the repository
        parser.error('--tests: no node ids given (leave out the tests part with --parts instead)')
    stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')
    out = args.out or Path(os.environ.get('OUT') or REPO / 'runs' / 'gpu-check' / stamp)
    out.mkdir(parents=True, exist_ok=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    cuda = capture([sys.executable, '-c', 'import torch; print(torch.cuda.is_available())']).endswith('True')
    total_s = args.total_s or float(os.environ.get('GPU_CHECK_TOTAL_S') or (450 if cuda else 1500))
    check = Check(out, total_s, parts)
    check.block_threads, check.models = args.block_threads, args.models
    facts: dict = {}
    try:
        facts = gpu_facts(check)
        # The DCNv3 build starts first and compiles while setup installs the wheels.
        if cuda:  # this GPU's architecture only, for every build from here on (DCNv3, DCNv4, DeepSpeed's JIT ops)
            arch = facts['capability']
            check.env.update(DCNV3_CUDA_ARCH_LIST=arch, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 8),
                             DS_ACCELERATOR='cuda', DCNV3_BUILD_DIR=str(SCRATCH / 'dcnv3-cache'))
            build = check.start('build', build_both_cmd(), check.budget('build')) if check.wants('build') else None
        elif not check.wants('build'):
            build = None
        elif os.environ.get('GPU_CHECK_SKIP_NVCC') == '1':
            check.parts['build'] = {'status': 'not run', 'reason': 'GPU_CHECK_SKIP_NVCC=1'}
            build = None
        else:
            check.env.update(DCNV3_CUDA_ARCH_LIST='9.0')
            build = check.start('build', check.py('-m', 'pretrain.ops', 'build', '--cuda'), check.budget('build'))
        dcnv4 = setup(check, cuda)
        if cuda:
            run_gpu(check, facts, build, dcnv4, start_h_plan(check, facts), tests)
        else:
            rehearse(check, build, tests)
    finally:
        for proc in check.background:  # a part that raised leaves the DCNv4 build or the H plan running
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for part in MIN_BUDGET_S:
            check.parts.setdefault(part, {'status': 'not run', 'reason': 'an earlier part raised'})
        write_report(check, facts, cuda)
        check.log.close()
    failed = [n for n, p in check.parts.items() if p['status'] in ('failed', 'timeout')]
    print(f'[gpu-check] report: {out}/gpu-report.md; '
          f'{"failed: " + ", ".join(failed) if failed else "every part that ran passed"}'
          f'{"" if cuda else "; NO CUDA DEVICE: this was the rehearsal, the real check needs a GPU"}', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
