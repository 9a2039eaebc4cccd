"""Runs you can trust: out_dir is never overwritten by accident, resume keeps the run's settings, early clear
failures, --help, and the layout that keeps ad-hoc runs out of the committed results/."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from machine import free_cores
from conftest import ROOT, TINY, Forked, args_for, one_line_error, run_forked, run_train_fast


@pytest.fixture
def finished(vit_run):
    """A finished 1-epoch run on small_data_dir (conftest's vit_run, shared with test_reliability: never changed
    here; a test that changes a run copies it)."""
    return vit_run


def git_status():
    proc = subprocess.run(['git', 'status', '--porcelain'], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def test_default_out_dir_is_the_ignored_out_folder(small_data_dir):
    """A run without --out_dir (the README's commands) writes out/<run_name>/seed<seed>/, which git ignores."""
    out_dir = os.path.join(ROOT, 'out', 'mnist_vit', 'seed9173')
    new_folders = [f for f in (out_dir, os.path.dirname(out_dir), os.path.join(ROOT, 'out')) if not os.path.exists(f)]
    before = git_status()
    try:
        run_train_fast('config/mnist_vit.py', f'--data_dir={small_data_dir}', '--epochs=1', '--seed=9173', *TINY)
        assert os.path.isfile(os.path.join(out_dir, 'metrics.json'))
        assert not os.path.exists(os.path.join(ROOT, 'results', 'mnist_vit', 'seed9173'))
        assert git_status() == before
    finally:  # the checkout as it was: out/ and out/mnist_vit/ too where the run made them
        shutil.rmtree(out_dir, ignore_errors=True)
        for folder in new_folders[1:]:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def test_a_finished_run_is_never_replaced_by_accident(small_data_dir, finished, tmp_path):
    metrics = (finished / 'metrics.json').read_bytes()
    start = time.time()
    proc = run_train_fast(*args_for(small_data_dir, finished, '--epochs=1'), check=False)
    line = one_line_error(proc, str(finished), 'already holds a run', '--init_from=resume', '--out_dir', '--seed',
                          '--overwrite=True')
    assert 'train /' not in proc.stdout and time.time() - start < 15  # refused before the data loads
    assert (finished / 'metrics.json').read_bytes() == metrics
    shutil.copytree(finished, tmp_path / 'copy')
    proc = run_train_fast(*args_for(small_data_dir, tmp_path / 'copy', '--epochs=1', '--overwrite=True', '--seed=1'))
    assert 'epoch 1/1 done' in proc.stdout
    assert (tmp_path / 'copy' / 'metrics.json').read_bytes() != metrics


def test_two_identical_runs_started_together_one_refuses(small_data_dir, tmp_path):
    procs = [Forked('train.py', *args_for(small_data_dir, tmp_path, '--epochs=2')) for _ in range(2)]
    results = [(p.wait(), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refusal = next(err for code, err in results if code)
    assert str(tmp_path) in refusal and ('in use by a running process' in refusal or 'already holds a run' in refusal)
    assert not (tmp_path / 'run.lock').exists()  # released at exit
    assert [p for p in os.listdir(tmp_path) if p.endswith('.tmp')] == []


def test_a_stale_lock_is_reported_and_taken_over(small_data_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'run.lock').write_text(str(dead.pid))
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--epochs=1'))
    assert f"left by process {dead.pid}, which is no longer running" in proc.stdout
    assert not (tmp_path / 'run.lock').exists()


def test_a_live_lock_stops_the_run(small_data_dir, tmp_path):
    (tmp_path / 'run.lock').write_text(str(os.getpid()))  # this test process: alive
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--epochs=1'), check=False)
    one_line_error(proc, str(tmp_path), 'in use by a running process', f'pid {os.getpid()}')
    assert (tmp_path / 'run.lock').read_text() == str(os.getpid())


@pytest.mark.parametrize('flag,message', [('--epochs=2', 'epochs 1 -> 2'), ('--seed=1', 'seed 0 -> 1'),
                                          ('--learning_rate=1e-2', 'learning_rate 0.003 -> 0.01'),
                                          ('--augment=crop', "augment 'none' -> 'crop'")])
def test_resume_refuses_other_settings(small_data_dir, finished, flag, message):
    proc = run_train_fast(*args_for(small_data_dir, finished, '--epochs=1', '--init_from=resume', flag), check=False)
    one_line_error(proc, 'was trained with other settings', message)
    assert 'train /' not in proc.stdout  # before the data loads


def test_resume_refuses_a_precision_that_auto_resolved_differently(small_data_dir, finished, tmp_path):
    """dtype='auto' is the same setting everywhere but bfloat16 on one machine and float32 on another."""
    with open(finished / 'metrics.json') as f:
        precision = json.load(f)['precision']
    assert precision in ('float32', 'bfloat16')  # what 'auto' resolved to on this CPU
    checkpoint = torch.load(finished / 'ckpt.pt', weights_only=True)
    assert checkpoint['precision'] == precision
    checkpoint['precision'] = 'float16'  # as 'auto' resolves on a GPU without bfloat16, never on a CPU
    torch.save(checkpoint, tmp_path / 'ckpt.pt')
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--epochs=1', '--init_from=resume'), check=False)
    one_line_error(proc, 'was trained with other settings', f"precision 'float16' -> '{precision}'", "dtype='auto'")


def test_resume_takes_settings_that_cannot_change_the_result(small_data_dir, finished, tmp_path):
    shutil.copytree(finished, tmp_path / 'run')
    same_data = f'--data_dir={small_data_dir}/../{os.path.basename(small_data_dir)}'
    proc = run_train_fast(*args_for(small_data_dir, tmp_path / 'run', '--epochs=1', '--init_from=resume',
                                    '--log_interval=7', same_data))
    assert 'is finished' in proc.stdout and 'test loss' in proc.stdout


def test_an_unwritable_out_dir_fails_at_once(small_data_dir, tmp_path):
    (tmp_path / 'file').write_text('')
    start = time.time()
    proc = run_train_fast(*args_for(small_data_dir, tmp_path / 'file' / 'run'), check=False)
    one_line_error(proc, 'cannot write to out_dir', str(tmp_path / 'file' / 'run'))
    assert time.time() - start < 15 and 'train /' not in proc.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_out_dir_fails_at_once(small_data_dir, tmp_path):
    tmp_path.chmod(0o555)
    try:
        proc = run_train_fast(*args_for(small_data_dir, tmp_path / 'run'), check=False)
        one_line_error(proc, 'cannot write to out_dir')
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize('script', ['train.py', 'bench.py'])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_setting_with_its_default(script, flag):
    proc = run_forked(script, flag, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--learning_rate=1e-3" in proc.stdout and 'optimizer' in proc.stdout and '--overwrite=False' in proc.stdout
    assert '--compile=' in proc.stdout and "'auto'" in proc.stdout
    if script == 'bench.py':
        assert '--timed_steps=30' in proc.stdout


def test_plot_help():
    proc = subprocess.run([sys.executable, 'plot.py', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith('usage: python plot.py')


def test_free_cores_are_those_other_processes_leave(monkeypatch):
    """A run takes the cores other processes leave free: spinning OpenMP threads collapse on shared cores."""
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
    # (time, machine CPU seconds, this process's CPU seconds) 10 s apart: this process used 20 of the machine's N s
    for others, expected in ((0.0, 2), (1.0, 1), (2.0, 1), (0.1, 2), (0.3, 1), (3.5, 1)):
        assert free_cores((0.0, 100.0, 50.0), (10.0, 100.0 + 20 + 10 * others, 70.0)) == expected, others


def test_a_cpu_run_gives_way_to_a_busy_core(small_data_dir, tmp_path):
    """With another process spinning on one of 2 cores, train.py trains with one thread and says so; with
    OMP_NUM_THREADS set it keeps that count and says nothing."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip('needs 2 cores')
    spinner = subprocess.Popen([sys.executable, '-c', 'import time\nend = time.time() + 60\nwhile time.time() < end: pass'])
    try:
        env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
        args = [sys.executable, 'train.py', f'--data_dir={small_data_dir}', *TINY, '--epochs=1']
        runs = [(subprocess.Popen(args + [f'--out_dir={tmp_path / str(len(extra_env))}'], cwd=ROOT, text=True,
                                  env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE), expected)
                for extra_env, expected in (({}, True), ({'OMP_NUM_THREADS': '2'}, False))]  # side by side
        for proc, expected in runs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr
            assert ('training with 1 thread\n' in stdout) == expected, stdout
    finally:
        spinner.kill()


# train.py under a fake /proc/stat (machine.cpu_reading) on 2 cores, where another process keeps a core busy in every
# other 10 s window and each reading looks 10 s old, so that the run refits its threads at every step; torch.compile
# with dynamo's eager backend (no C++ compiler needed), which guards on the thread count all the same. Prints the
# counts train.py set and how many graphs dynamo compiled.
FLIPPING_LOAD = r"""
import os, runpy, sys
import machine, torch, torch._dynamo
readings, counts = [], []
set_num_threads, compile_ = torch.set_num_threads, torch.compile


def cpu_reading():
    readings.append(len(readings))
    busy = sum(k % 2 for k in readings[1:])  # another process: one core in every other window
    return 10.0 * len(readings), 10.0 * busy, 0.0


machine.cpu_reading = cpu_reading
os.sched_getaffinity = lambda pid: {0, 1}
torch.set_num_threads = lambda n: counts.append(n) or set_num_threads(n)
torch.compile = lambda model: compile_(model, backend='eager')
os.environ.pop('OMP_NUM_THREADS', None)
set_num_threads(2)
sys.argv[0] = 'train.py'
runpy.run_path('train.py', run_name='__main__')
print('thread counts', counts, 'graphs', torch._dynamo.utils.counters['stats']['unique_graphs'])
"""


@pytest.mark.parametrize('compiled', [False, True])
def test_a_compiled_cpu_run_keeps_its_thread_count(small_data_dir, tmp_path, compiled):
    """torch.compile guards on the thread count: a compiled run that refitted its threads to the load would recompile
    at each change (and run eager after 8). So it fits them once, before compiling; an eager run refits as it goes."""
    script = tmp_path / 'flipping_load.py'
    script.write_text(FLIPPING_LOAD)
    proc = run_forked(str(script), 'config/mnist_vit.py', f'--data_dir={small_data_dir}', f'--out_dir={tmp_path / "run"}',
                      *TINY, '--epochs=1', f'--compile={compiled}', timeout=300)
    counts = [int(n) for n in proc.stdout.split('thread counts [')[1].split(']')[0].split(',') if n.strip()]
    if compiled:
        assert len(counts) <= 1 and 'recompile' not in proc.stderr
    else:
        assert len(counts) > 2 and set(counts) == {1, 2}  # the fake load does flip, and an eager run follows it


def test_bare_make_prints_help_and_studies_write_to_results():
    if shutil.which('make') is None:
        pytest.skip('no make')
    proc = subprocess.run(['make'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and 'make mnist' in proc.stdout and 'train.py' not in proc.stderr
    dry = subprocess.run(['make', '-n', 'mnist', 'SEEDS=3'], cwd=ROOT, capture_output=True, text=True).stdout
    assert '--out_dir=results/mnist_$v/seed$seed' in dry


def test_readme_is_a_short_manual():
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    assert len(readme) <= 14_000
    assert 'results/NOTES.md' in readme and os.path.isfile(os.path.join(ROOT, 'results', 'NOTES.md'))
    assert 'download.pytorch.org/whl/cpu' in readme  # the CPU-only torch install
    with open(os.path.join(ROOT, '.ci', 'run')) as f:
        assert 'python -m pytest tests' in f.read() and 'python -m pytest tests' in readme
