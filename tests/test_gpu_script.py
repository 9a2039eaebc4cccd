"""gpu.sh, the one command for a GPU session, dry-run on the CPU (tiny models, a few steps) so it cannot rot."""

import json
import os
import subprocess
import sys
import tarfile

from conftest import ROOT


def test_gpu_script_dry_run(data_dir, tmp_path):
    (tmp_path / 'out').mkdir()
    env = dict(os.environ, DRY_RUN='1', DATA_DIR=data_dir, RESULTS_DIR=str(tmp_path / 'results'), OUT=str(tmp_path / 'out'),
               OMP_NUM_THREADS='1', PYTHON=sys.executable)
    proc = subprocess.run(['bash', 'gpu.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out,) = (tmp_path / 'results').glob('gpu_dry_run_*')  # a new folder per session, named by its date and time
    for step in ('1/4 CUDA tests', '2/4 bench', '3/4 config/mnist_vit.py', '4/4 CIFAR-10', 'done'):
        assert step in (out / 'log.txt').read_text()
    for config in ('mnist_vit', 'cifar10_vit', 'cifar10_small_vit'):
        rows = [json.loads(line) for line in (out / f'bench_{config}.txt').read_text().splitlines() if line.startswith('{')]
        assert {(r['attention'], r['impl']) for r in rows} == {(a, i) for a in ('classic', 'diff', 'diff2') for i in ('fused', 'explicit')}
    rows = [json.loads(line) for line in (out / 'bench_pipeline.txt').read_text().splitlines() if line.startswith('{')]
    assert [r['pipeline'] for r in rows if 'pipeline' in r] == ['resident', 'dataloader']
    assert json.loads((out / 'mnist_wall.json').read_text())['wall_s'] > 0
    for run in ('mnist_vit', 'cifar10_vit', 'cifar10_balanced', 'cifar10_diff', 'bfloat16/cifar10_diff'):
        with open(out / run / 'seed0' / 'metrics.json') as f:
            m = json.load(f)
        assert m['test'] is not None and 'outliers' in m
        assert m['config']['dtype'] == {'mnist_vit': 'auto', 'bfloat16/cifar10_diff': 'bfloat16'}.get(run, 'float32')
    assert not list(out.rglob('ckpt.pt'))
    with tarfile.open(tmp_path / 'out' / 'gpu_dry_run.tar.gz') as tar:
        assert f'{out.name}/bfloat16/cifar10_diff/seed0/metrics.json' in tar.getnames()
    assert sorted(os.listdir(tmp_path / 'out')) == ['gpu_dry_run.tar.gz', 'log.txt']  # the device tool takes 8 files
