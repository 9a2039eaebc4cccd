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


def make(*args, cwd=ROOT):
    return subprocess.run(['make', '-s', '--no-print-directory', *args], cwd=cwd, capture_output=True, text=True)


def git(*args, cwd=ROOT):
    return subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def tree_bytes(cwd):
    """What a call to the GPU machine carries: tracked files, and untracked ones git does not ignore."""
    names = [name for name in git('ls-files', '-z', '--cached', '--others', '--exclude-standard', cwd=cwd).split('\0')
             if name]
    return {name: os.lstat(os.path.join(cwd, name)).st_size for name in names
            if os.path.lexists(os.path.join(cwd, name))}


def test_the_working_tree_without_its_weights_leaves_room_for_gpu_data():
    """The committed weights grow with every run and no GPU command reads them: `make gpu_light` leaves them behind
    (the next test). What stays must leave at least 8 MiB of a 64 MiB call, less a 4 MiB margin, for a data part."""
    light = sum(size for name, size in tree_bytes(ROOT).items()
                if not (name.startswith('results/') and name.endswith(('/model.pt', '/attention.npz'))))
    assert light + 8 * 2 ** 20 <= 60 * 2 ** 20, f'{light} bytes travel even without the weights'


@pytest.mark.parametrize('venv', ['.venv', 'venv', 'env', 'ENV'])
def test_a_virtual_environment_made_inside_the_clone_is_ignored(venv):
    """Most newcomers make the venv inside the clone (python -m venv .venv): git ignores it, so that it stays out of
    git status and of the tree a GPU call carries (tree_bytes, above: 900 MB of torch would not fit)."""
    path = f'{venv}/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so'
    assert subprocess.run(['git', 'check-ignore', '-q', path], cwd=ROOT).returncode == 0


def test_gpu_light_leaves_the_weights_behind_and_gpu_restore_undoes_it(tmp_path):
    """In a repository of its own (the Makefile, .gitignore and a fake results/): gpu_light takes the weights and attention
    samples out of the index, not off the disk; `make gpu_data` cuts its parts to fit beside what is left (64 MiB
    less a 4 MiB margin), and refuses when that is under 8 MiB; gpu_restore makes the index HEAD's again. No dataset
    needed: make -n prints what it would run."""
    repo = tmp_path / 'repo'
    weights = {'results/a/seed0/model.pt': 300_000, 'results/study/lr1e-3/b/seed1/model.pt': 200_000,
               'results/study/lr1e-3/b/seed1/attention.npz': 50_000}
    kept = {'results/a/seed0/metrics.json': 100, 'results/model.pt.md': 10, 'Makefile': None, '.gitignore': None}
    for name, size in {**weights, **kept}.items():
        os.makedirs(os.path.dirname(repo / name), exist_ok=True)
        with open(repo / name, 'wb') as f:
            f.write(open(os.path.join(ROOT, name), 'rb').read() if size is None else os.urandom(size))
    git('init', '-q', cwd=repo)
    git('add', '.', cwd=repo)
    git('-c', 'user.name=test', '-c', 'user.email=test@example.com', 'commit', '-q', '-m', 'fake', cwd=repo)

    proc = make('gpu_light', cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert set(tree_bytes(repo)) == set(kept)
    assert all((repo / name).stat().st_size == size for name, size in weights.items())  # still on the disk
    assert make('gpu_light', cwd=repo).returncode != 0  # twice: refused
    light = sum(tree_bytes(repo).values())
    part = int(make('gpu_data_part_size', cwd=repo).stdout)
    assert part == 60 * 2 ** 20 - light
    dry_run = make('-n', 'gpu_data', cwd=repo).stdout
    assert f' split -b {part} -d ' in dry_run
    assert dry_run.index('exit 1') < dry_run.index('rm -rf gpu_data')  # the size is checked before gpu_data/ goes
    proc = make('gpu_data_part_size', 'GPU_CALL_MIB=11', cwd=repo)  # 7 MiB less the tree for a part: refused
    assert proc.returncode != 0 and proc.stderr.startswith('error: a ') and 'under 8 MiB' in proc.stderr, proc.stderr
    assert not proc.stdout

    proc = make('gpu_restore', cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert set(tree_bytes(repo)) == set(weights) | set(kept)
    assert git('status', '--porcelain', '--ignored', cwd=repo) == ''  # results/.gitignore gone too


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


def fake_python(tmp_path):
    """A stand-in for python that logs each run it is given, then ends it by the name of its out_dir: crash exits 1
    (an error), stopped exits 143 (SIGTERM: saved), any other finishes (a metrics.json with a test result)."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\nfor a; do case "$a" in --out_dir=*) out=${a#--out_dir=} ;; esac; done\n'
                    f'echo "$out" >> {tmp_path}/started\n'
                    'case "$out" in */crash) exit 1 ;; */stopped) exit 143 ;; esac\n'
                    'echo \'{"test": {}}\' > "$out/metrics.json"\n')
    fake.chmod(0o755)
    return fake


def test_queue_ends_with_a_count_of_its_runs_and_goes_on_with_a_closed_stdout(tmp_path):
    runs = tmp_path / 'runs'
    for name, metrics in (('old', '{"test": {"acc": 0.9}}'), ('diverged', '{"test": null, "failures": ["nan"]}')):
        (runs / name).mkdir(parents=True)
        (runs / name / 'metrics.json').write_text(metrics)
    queue = tmp_path / 'queue.txt'
    queue.write_text('# finished before, failed before, fails now, stopped, finishes now\n\n'
                     + ''.join(f"{runs}/{name} config/mnist_vit.py\n"
                               for name in ('old', 'diverged', 'crash', 'stopped', 'new')))
    env = dict(os.environ, PYTHON=str(fake_python(tmp_path)))
    proc = subprocess.run(['bash', 'queue.sh', str(queue)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].endswith('] done: 2 finished, 1 skipped (failed before), 1 failed now, 1 left')
    assert (tmp_path / 'started').read_text().split() == [f"{runs}/{name}" for name in ('crash', 'stopped', 'new')]

    # the reader of its stdout gone (`bash queue.sh ... | tee` and tee ended): its lines fail, its runs go on
    (tmp_path / 'started').unlink()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(['bash', 'queue.sh', str(queue)], cwd=ROOT, env=env, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr
    assert (tmp_path / 'started').read_text().split() == [f"{runs}/{name}" for name in ('crash', 'stopped')]


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
