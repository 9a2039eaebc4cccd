"""gpu.sh, the one command for a GPU session, dry-run on the CPU (tiny models, a few steps) so it cannot rot; queue.sh,
the resumable queue of runs that it and the CPU studies work through; and the committed queues themselves."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from configurator import configure
from conftest import ROOT, TINY, train_defaults


def queue_lines(path):
    with open(path) as f:
        return [line.split() for line in f if line.strip() and not line.startswith('#')]


@pytest.mark.parametrize('queue', ['queue/cpu.txt', 'queue/gpu.txt'])
def test_every_committed_queue_line_is_a_valid_run(queue):
    """Each line's config files exist and its flags are settings of the right type (configure raises otherwise), and
    no two lines write to one out_dir."""
    lines = queue_lines(os.path.join(ROOT, queue))
    assert lines
    os.chdir(ROOT)
    for out_dir, *args in lines:
        configure(train_defaults(), args)
        assert not any(a.startswith('--out_dir') for a in args), out_dir
    assert len({out_dir for out_dir, *_ in lines}) == len(lines)


def test_gpu_script_dry_run(small_data_dir, tmp_path):
    queue = tmp_path / 'queue.txt'
    queue.write_text("# two runs, each with a setting of its own\n\nq/mnist_vit/seed0 config/mnist_vit.py --epochs=6\n"
                     "q/mnist_diff2/seed0 config/mnist_diff2.py --weight_decay=0.05\n")
    (tmp_path / 'out').mkdir()
    env = dict(os.environ, DRY_RUN='1', DATA_DIR=small_data_dir, RESULTS_DIR=str(tmp_path / 'results'),
               OUT=str(tmp_path / 'out'), OMP_NUM_THREADS='1', PYTHON=sys.executable, QUEUE=str(queue), WORKERS='2')
    proc = subprocess.run(['bash', 'gpu.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out,) = (tmp_path / 'results').glob('gpu_dry_run_2*')  # a new folder per command, named by its date and time
    log = (out / 'log.txt').read_text()
    for step in ('1/4 CUDA tests', '2/4 bench', '3/4 config/mnist_vit.py', '4/4 the queue', 'finished runs', 'done'):
        assert step in log
    bench = (out / 'bench_cifar10_vit.txt').read_text()
    rows = [json.loads(line) for line in bench.splitlines() if line.startswith('{')]
    assert {(r['attention'], r['impl'], r['dtype']) for r in rows} == {(a, 'fused', 'bfloat16') for a in ('classic', 'diff', 'diff2')}
    assert bench.count('profile of 2 training steps') == 3 and 'Self CPU time total' in bench
    assert json.loads((out / 'mnist_wall.json').read_text())['wall_s'] > 0
    runs = tmp_path / 'results' / 'gpu_dry_run_runs' / 'q'
    for run, weight_decay in (('mnist_vit', 0.1), ('mnist_diff2', 0.05)):
        m = json.loads((runs / run / 'seed0' / 'metrics.json').read_text())
        assert m['test'] is not None and 'outliers' in m and m['config']['weight_decay'] == weight_decay
        assert m['config']['epochs'] == 1 and m['config']['n_embd'] == 32  # the dry run's settings come last and win
    assert 'is in use' not in log  # the second worker never took the first worker's run (queue.sh's claim)
    with tarfile.open(tmp_path / 'out' / 'gpu_dry_run.tar.gz') as tar:
        names = tar.getnames()
    assert f'{out.name}/log.txt' in names and f'{out.name}/bench_cifar10_vit.txt' in names
    assert {'gpu_dry_run_runs/q/mnist_vit/seed0/metrics.json', 'gpu_dry_run_runs/q/mnist_diff2/seed0/train.log'} <= set(names)
    assert not [n for n in names if n.endswith(('ckpt.pt', '.lock'))]
    assert sorted(os.listdir(tmp_path / 'out')) == ['gpu_dry_run.tar.gz', 'log.txt']  # the device tool takes 8 files

    # a second command on the same machine: no checks again, nothing trained again
    time.sleep(1)  # a new folder name
    proc = subprocess.run(['bash', 'gpu.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (second,) = set((tmp_path / 'results').glob('gpu_dry_run_2*')) - {out}
    log = (second / 'log.txt').read_text()
    assert 'done by an earlier command' in log and '1/4 CUDA tests' not in log
    assert 'train.py' not in log and 'finished runs in' in log


def make(*args):
    return subprocess.run(['make', '-s', '--no-print-directory', *args], cwd=ROOT, capture_output=True, text=True)


def test_gpu_data_parts_fit_beside_the_working_tree():
    """A call to the GPU machine carries the working tree (tracked files, and untracked ones git does not ignore) and
    one part of gpu_data/ with SHA256SUMS, 64 MiB in all: `make gpu_data` cuts parts that fit beside the tree as it
    is now, and refuses when the tree leaves less than 8 MiB. No dataset needed: make -n prints what it would run."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split('\0')
    paths = [os.path.join(ROOT, name) for name in listed if name]
    tree = sum(os.lstat(path).st_size for path in paths if os.path.lexists(path))
    proc = make('gpu_data_part_size')
    assert proc.returncode == 0, proc.stderr
    part = int(proc.stdout)
    assert part >= 8 * 2 ** 20 and tree + part + 4096 <= 64 * 2 ** 20  # SHA256SUMS: 73 bytes a part
    dry_run = make('-n', 'gpu_data').stdout
    assert f' split -b {part} -d ' in dry_run
    assert dry_run.index('exit 1') < dry_run.index('rm -rf gpu_data')  # the size is checked before gpu_data/ goes

    proc = make('gpu_data_part_size', f'GPU_CALL_MIB={tree // 2 ** 20 + 11}')  # 6-7 MiB left for a part: refused
    assert proc.returncode != 0 and proc.stderr.startswith('error: a ') and 'under 8 MiB' in proc.stderr, proc.stderr
    assert not proc.stdout


def test_queue_resumes_an_interrupted_run_and_skips_finished_ones(data_dir, tmp_path):
    queue = tmp_path / 'queue.txt'
    queue.write_text('\n'.join(f"{tmp_path}/runs/{name} {' '.join(TINY)} --epochs={epochs} --seed={seed}"
                               for name, epochs, seed in (('a', 3, 0), ('b', 1, 1))) + '\n')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, ARGS=f'--data_dir={data_dir}')
    worker = subprocess.Popen(['bash', 'queue.sh', str(queue)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    checkpoint = tmp_path / 'runs' / 'a' / 'ckpt.pt'
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:  # the first epoch is done
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    stdout, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0 and checkpoint.exists(), stdout
    metrics = json.loads((tmp_path / 'runs' / 'a' / 'metrics.json').read_text())
    assert metrics['test'] is None and not (tmp_path / 'runs' / 'b').exists()  # stopped, and b never started

    proc = subprocess.run(['bash', 'queue.sh', str(queue)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'runs/a: ' in proc.stdout and '--init_from=resume' in proc.stdout
    assert 'resuming' in (tmp_path / 'runs' / 'a' / 'train.log').read_text()
    for name, epochs in (('a', 3), ('b', 1)):
        m = json.loads((tmp_path / 'runs' / name / 'metrics.json').read_text())
        assert m['test'] is not None and len(m['history']) == epochs

    proc = subprocess.run(['bash', 'queue.sh', str(queue)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and 'train.py' not in proc.stdout, proc.stdout  # nothing left to do
    proc = subprocess.run(['bash', 'queue.sh', str(tmp_path / 'missing.txt')], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and 'queue file' in proc.stderr


def test_two_workers_started_together_never_take_the_same_run(tmp_path):
    """train.py takes run.lock only after its imports; queue.sh's claim covers those seconds. A stand-in for python
    that takes 2 s to start logs each run it is given and then finishes it."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\nsleep 2\nfor a; do case "$a" in --out_dir=*) out=${a#--out_dir=} ;; esac; done\n'
                    f'echo "$out" >> {tmp_path}/started\necho \'{{"test": {{}}}}\' > "$out/metrics.json"\n')
    fake.chmod(0o755)
    queue = tmp_path / 'queue.txt'
    queue.write_text(''.join(f"{tmp_path}/runs/{name} config/mnist_vit.py\n" for name in 'abc'))
    env = dict(os.environ, PYTHON=str(fake))
    workers = [subprocess.Popen(['bash', 'queue.sh', str(queue)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    logs = [w.communicate(timeout=60)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    started = (tmp_path / 'started').read_text().split()
    assert sorted(started) == [f"{tmp_path}/runs/{name}" for name in 'abc'], logs  # each run once, none twice
