import json
import re

import pytest

from machine import cpu_name
from conftest import one_line_error, run_forked

STEP_KEYS = {'config', 'attention', 'impl', 'compile', 'device', 'dtype', 'batch_size', 'img_per_s', 'step_ms',
             'peak_mem_mb', 'threads'}
TINY_BENCH = ['config/mnist_vit.py', '--device=cpu', '--n_layer=1', '--n_embd=32', '--mlp_dim=64', '--batch_size=32',
              '--warmup_steps=1', '--timed_steps=2', '--compiles=False']


@pytest.fixture(scope='module')
def smoke_run(small_data_dir):
    """Every attention and impl, and both pipelines, on small_data_dir's 640 training images."""
    proc = run_forked('bench.py', *TINY_BENCH, f'--data_dir={small_data_dir}', '--pipeline=True', '--num_workers=0',
                      check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_reports_every_setting_and_both_pipelines(smoke_run):
    """A smoke run: the JSON lines are complete and sane. Speed itself is measured by running bench.py, not here."""
    lines = [json.loads(line) for line in smoke_run.splitlines() if line.startswith('{')]
    steps = [r for r in lines if 'impl' in r]
    assert {(r['attention'], r['impl']) for r in steps} == {(a, i) for a in ('classic', 'diff', 'diff2') for i in ('fused', 'explicit')}
    assert all(STEP_KEYS <= set(r) and r['img_per_s'] > 0 and r['peak_mem_mb'] > 0 and r['batch_size'] == 32 for r in steps)
    assert all(r['threads'] == 1 for r in steps)  # OMP_NUM_THREADS=1 (the tests' environment) fixes the count
    assert all(r['cpu'] == cpu_name() for r in steps) and f"cpu ({cpu_name()}, 1 thread for every setting)" in smoke_run
    pipelines = [r for r in lines if 'pipeline' in r]
    assert sorted((r['attention'], r['pipeline']) for r in pipelines) == [(a, p) for a in ('classic', 'diff', 'diff2')
                                                                          for p in ('dataloader', 'resident')]
    assert all(r['epoch_s'] > 0 and r['img_per_s'] > 0 for r in pipelines)
    assert 'FLOPs per training image' in smoke_run


def test_bench_table_headers_sit_over_their_columns(smoke_run):
    """Every cell of the table ends where its header ends (right-aligned), 'explicit' and 'fused' rows alike."""
    lines = smoke_run.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ['attention', 'impl'])
    names = ['attention', 'impl', 'compile', 'img/s', 'step ms', 'peak MB', 'MFU']
    ends = [lines[header].index(name) + len(name) for name in names]
    rows = lines[header + 1:header + 7]
    assert sorted(row.split()[1] for row in rows) == ['explicit'] * 3 + ['fused'] * 3
    for row in rows:
        assert [m.end() for m in re.finditer(r'\S+', row)] == ends, '\n'.join([lines[header], row])


# bench.py with a fake /proc/stat (machine.cpu_reading) on a machine of 2 cores: another process keeps one core
# busy during the first 4 readings, then none. The first argument is OMP_NUM_THREADS ('' for none); the torch thread
# count starts as a fresh process's would; the readings' times are printed at the end.
FAKE_LOAD = r"""
import json, os, runpy, sys, time
import machine, torch
readings = []


def cpu_reading():
    now, own = time.time(), sum(os.times()[:2])
    others = 1.0 if len(readings) < 4 else 0.0
    readings.append(now)
    return now, others * now + own, own


machine.cpu_reading = cpu_reading
os.sched_getaffinity = lambda pid: {0, 1}
omp = sys.argv.pop(1)
if omp:
    os.environ['OMP_NUM_THREADS'] = omp
else:
    del os.environ['OMP_NUM_THREADS']
torch.set_num_threads(int(omp or 2))
sys.argv[0] = 'bench.py'
runpy.run_path('bench.py', run_name='__main__')
print('readings', json.dumps(readings))
"""


@pytest.mark.parametrize('omp', ['', '2'])
def test_bench_times_every_setting_with_the_threads_the_load_leaves(tmp_path, omp):
    """Two benches started together must not time with spinning threads on shared cores: the bench reads the load over
    1.5 s before it starts and times every setting of its table with the cores that other processes left free then, a
    count its header names (a count that changed between settings would make the table unreadable, and recompile a
    compiled model). OMP_NUM_THREADS fixes the count: no reading then."""
    script = tmp_path / 'fake_load.py'
    script.write_text(FAKE_LOAD)
    proc = run_forked(str(script), omp, *TINY_BENCH, '--impls=explicit')
    lines = proc.stdout.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith('{')]
    readings = json.loads(next(line for line in lines if line.startswith('readings '))[len('readings '):])
    header = next(line for line in lines if 'for every setting' in line)
    if omp:
        assert [r['threads'] for r in rows] == [2, 2, 2] and not readings and '2 threads for every setting' in header
        return
    assert [r['attention'] for r in rows] == ['classic', 'diff', 'diff2'] and [r['threads'] for r in rows] == [1, 1, 1]
    assert len(readings) == 2 and readings[1] - readings[0] >= 1.5 and '1 thread for every setting' in header


# bench.py with a fourth attention kind: classic attention under another name, one class and one entry in ATTENTIONS
TOY_KIND = r"""
import runpy, sys
import model


class Toy(model.Attention):
    pass


model.ATTENTIONS['toy'] = Toy
sys.argv[0] = 'bench.py'
runpy.run_path('bench.py', run_name='__main__')
"""


def test_bench_times_every_kind_the_model_has(tmp_path):
    """The kinds come from model.ATTENTIONS and their FLOPs from the model: a new kind needs nothing in bench.py."""
    script = tmp_path / 'toy_kind.py'
    script.write_text(TOY_KIND)
    proc = run_forked(str(script), *TINY_BENCH, '--impls=explicit')
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert [r['attention'] for r in rows] == ['classic', 'diff', 'diff2', 'toy']
    assert rows[3]['gflops_per_img'] == rows[0]['gflops_per_img'] > 0
    assert rows[2]['gflops_per_img'] > rows[0]['gflops_per_img']  # diff2's second queries and λ projection
    one_line_error(run_forked('bench.py', *TINY_BENCH, '--attentions=classic,flash', check=False), 'unknown kind flash')
