import json

from conftest import run_forked

STEP_KEYS = {'config', 'attention', 'impl', 'compile', 'device', 'dtype', 'batch_size', 'img_per_s', 'step_ms',
             'peak_mem_mb'}


def test_bench_reports_every_setting_and_both_pipelines(small_data_dir):
    """A smoke run: the JSON lines are complete and sane. Speed itself is measured by running bench.py, not here.
    The pipelines' epochs are of small_data_dir's 640 training images."""
    proc = run_forked('bench.py', 'config/mnist_vit.py', f'--data_dir={small_data_dir}', '--device=cpu', '--n_layer=1',
                      '--n_embd=32', '--mlp_dim=64', '--batch_size=32', '--warmup_steps=1', '--timed_steps=2',
                      '--compiles=False', '--pipeline=True', '--num_workers=0', check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    steps = [r for r in lines if 'impl' in r]
    assert {(r['attention'], r['impl']) for r in steps} == {(a, i) for a in ('classic', 'diff', 'diff2') for i in ('fused', 'explicit')}
    assert all(STEP_KEYS <= set(r) and r['img_per_s'] > 0 and r['peak_mem_mb'] > 0 and r['batch_size'] == 32 for r in steps)
    pipelines = [r for r in lines if 'pipeline' in r]
    assert sorted((r['attention'], r['pipeline']) for r in pipelines) == [(a, p) for a in ('classic', 'diff', 'diff2')
                                                                          for p in ('dataloader', 'resident')]
    assert all(r['epoch_s'] > 0 and r['img_per_s'] > 0 for r in pipelines)
    assert 'FLOPs per training image' in proc.stdout
