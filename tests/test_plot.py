import json
import os
import subprocess
import sys

import numpy as np
import pytest

import plot
from conftest import ROOT

ACCS = {'vit': [0.97, 0.98, 0.99], 'balanced': [0.96, 0.96, 0.96], 'diff': [0.99, 0.991, 0.992]}


def write_run(root, dataset, variant, seed, acc, epochs=4, attention=True, outliers=None, epoch_s=2.0):
    out = os.path.join(root, f'{dataset}_{variant}', f'seed{seed}')
    os.makedirs(out)
    history = [dict(epoch=e, step=10 * e, lr=1e-3, train_loss=1 / e, train_acc=acc - 0.1 / e, val_loss=1 / e + seed * 0.01,
                    val_acc=acc - 0.05 / e, time_s=epoch_s * e) for e in range(1, epochs + 1)]
    config = dict(epochs=epochs, seed=seed, out_dir=out, learning_rate=1e-3)
    metrics = dict(run=f'{dataset}_{variant}', seed=seed, dataset=dataset, config=config, params=1000 + (variant == 'diff'),
                   history=history, test=dict(loss=1 - acc, acc=acc), best_val_loss=history[-1]['val_loss'],
                   train_time_s=8.0, images_per_s=500.0, device='cpu', torch='x', attn_focus=acc / 2)
    if outliers is not None:
        metrics['outliers'] = outliers
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(metrics, f)
    if attention:
        rng = np.random.default_rng(seed)
        np.savez(os.path.join(out, 'attention.npz'), images=rng.integers(0, 255, (16, 1, 28, 28), dtype=np.uint8),
                 labels=np.arange(16) % 10, patch_size=np.array(4),
                 cls_attn=rng.random((2, 16, 1 if variant == 'diff' else 2, 49)) - (0.3 if variant == 'diff' else 0))


@pytest.fixture
def results(tmp_path):
    for dataset in ('mnist', 'fashionmnist'):
        for variant, accs in ACCS.items():
            for seed, acc in enumerate(accs):
                write_run(str(tmp_path), dataset, variant, seed, acc)
    return tmp_path


def test_figures_and_table(results, capsys):
    plot.main(str(results))
    for dataset in ('mnist', 'fashionmnist'):
        for kind in ('val_loss', 'val_acc', 'attention'):
            path = results / f'{dataset}_{kind}.png'
            assert path.exists() and path.stat().st_size > 10_000
    table = (results / 'README.md').read_text()
    rows = [line for line in table.splitlines() if line.startswith('| mnist_')]
    assert [r.split(' | ')[0] for r in rows] == ['| mnist_vit', '| mnist_balanced', '| mnist_diff']
    vit = rows[0].split(' | ')
    assert vit[4] == '98.00 ± 1.00'  # test acc in %, mean ± sample std
    assert vit[3] == '0.0200 ± 0.0100'  # test loss
    assert vit[2] == f"{np.mean([0.25, 0.26, 0.27]):.4f} ± 0.0100"  # last epoch's val loss
    assert vit[5] == '0.490 ± 0.005' and vit[6] == '3' and vit[7] == '2.0' and vit[8] == '0.1 ± 0.0'
    assert 'min to 70% val' not in table  # MNIST reaches it in the first epoch: only CIFAR-10 reports it
    assert '95.51' in table  # the old project's table sits beside ours
    assert 'mnist_diff vs mnist_balanced, test acc (points): +3.1000' in table
    assert 'significant (p < 0.05)' in table and 'not significant' in table


def test_table_and_written_files_are_printed(results, capsys):
    plot.main(str(results))
    out = capsys.readouterr().out.strip()
    table, wrote = out.rsplit('\n', 1)
    assert table.strip() == (results / 'README.md').read_text().strip()
    assert wrote.startswith('wrote ') and f"{results}/mnist_attention.png" in wrote and f"{results}/README.md" in wrote


def test_runs_with_other_settings_are_never_mixed(tmp_path):
    for seed in range(3):
        write_run(str(tmp_path), 'mnist', 'vit', seed, 0.97)
    write_run(str(tmp_path), 'mnist', 'vit', 3, 0.90, epochs=1)
    proc = subprocess.run([sys.executable, 'plot.py', str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert 'epochs (4 vs 1)' in proc.stderr and 'mnist_vit' in proc.stderr and 'seed3' in proc.stderr
    assert 'seed' not in proc.stderr.split('differ in')[1].split('(')[0]  # the seed itself may differ
    assert not (tmp_path / 'README.md').exists()


def test_seeds_whose_dtype_resolved_differently_are_never_mixed(tmp_path):
    for seed, precision in enumerate(['float32', None, 'bfloat16']):  # None: a run from before train.py recorded it
        write_run(str(tmp_path), 'mnist', 'vit', seed, 0.97)
        if precision:
            path = tmp_path / 'mnist_vit' / f'seed{seed}' / 'metrics.json'
            path.write_text(json.dumps(dict(json.loads(path.read_text()), precision=precision)))
    proc = subprocess.run([sys.executable, 'plot.py', str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "precision ('float32' vs 'bfloat16')" in proc.stderr and 'seed2' in proc.stderr
    (tmp_path / 'mnist_vit' / 'seed2' / 'metrics.json').unlink()
    plot.main(str(tmp_path))  # float32 beside an unrecorded one pools
    assert '| 2 |' in (tmp_path / 'README.md').read_text()


def test_a_subfolder_is_its_own_study_never_pooled(tmp_path):
    for seed in range(2):
        write_run(str(tmp_path), 'mnist', 'vit', seed, 0.97)
        write_run(str(tmp_path / 'gpu_card'), 'mnist', 'vit', seed, 0.90, epochs=1)  # other settings, same run name
    plot.main(str(tmp_path))
    table = (tmp_path / 'README.md').read_text()
    sections = table.split('## mnist')[1:]
    assert [s.split('\n')[0] for s in sections] == ['', ' (gpu_card/)']  # the folder's own runs first
    assert '| mnist_vit | 1,000 | 0.2550 ± 0.0071 |' in sections[0] and '97.00 ± 0.00' in sections[0]
    assert '90.00 ± 0.00' in sections[1] and '95.51' not in sections[1]  # the old project's table only once
    assert (tmp_path / 'gpu_card' / 'mnist_val_acc.png').exists() and '(gpu_card/mnist_val_acc.png)' in sections[1]
    assert '(mnist_val_acc.png)' in sections[0]


def test_attention_figure_shares_its_colour_scales_and_names_seed_and_classes(results, monkeypatch):
    figures = []
    monkeypatch.setattr(plot.plt, 'close', figures.append)
    plot.attention_figure('fashionmnist', plot.load_runs(str(results))['.', 'fashionmnist'], str(results / 'a.png'))
    fig = figures[0]
    rows = {}
    for ax in fig.axes:
        if ax.images and len(ax.images) == 2:  # an image with its attention overlay
            rows.setdefault(ax.get_subplotspec().rowspan.start, []).append(ax.images[1].get_clim())
    classic = rows[1] + rows[2]
    diff = rows[3]
    assert len(set(classic)) == 1 and classic[0][0] == 0
    assert len(set(diff)) == 1 and diff[0][0] == -diff[0][1]
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ['vit\nseed 0', 'balanced\nseed 0', 'diff\nseed 0\n(signed)']
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:2] == ['T-shirt', 'trouser']  # labels 0 and 1


def test_outlier_table_and_tests(tmp_path):
    for variant, scale in (('vit', 10.0), ('diff', 1.0)):
        for seed in range(3):
            outliers = {k: dict(top1=scale * (5 + seed), top10=scale * 4, median=0.5) for k in ('attn_logits', 'activations')}
            write_run(str(tmp_path), 'cifar10', variant, seed, 0.7, attention=False, outliers=outliers)
    plot.main(str(tmp_path))
    table = (tmp_path / 'README.md').read_text()
    assert '| cifar10_vit | 60.0 ± 10.0 | 40.0 ± 0.0 | 0.500 ± 0.000 | 60.0 ± 10.0 | 40.0 ± 0.0 | 0.500 ± 0.000 | 3 |' in table
    assert 'cifar10_diff vs cifar10_vit, largest |attention logit|: -54.0000' in table
    assert 'cifar10_diff vs cifar10_vit, largest |activation|: -54.0000' in table


def test_time_to_validation_accuracy(tmp_path):
    for seed, acc in enumerate((0.72, 0.74, 0.815)):  # val_acc = acc - 0.05 / epoch, 10 minutes per epoch, epochs 1-4
        write_run(str(tmp_path), 'cifar10', 'vit', seed, acc, attention=False, epoch_s=600.0)
    plot.main(str(tmp_path))
    lines = (tmp_path / 'README.md').read_text().splitlines()
    header = next(line for line in lines if line.startswith('| model'))
    row = dict(zip(header.split(' | '), next(line for line in lines if line.startswith('| cifar10_vit')).split(' | ')))
    # 70% in epochs 3, 2, 1 (30, 20, 10 minutes); 80% only by seed 2, in epoch 4
    assert row['min to 70% val'] == '20.0 ± 10.0'
    assert row['min to 80% val'] == '40.0 (1 of 3 seeds)'


def test_welch_t_test_matches_reference_values():
    # worked by hand: means 2.5 and 4.5, variances 5/3, t = -2 / sqrt(5/6), df = 6, two-sided p from t tables
    t, p = plot.welch([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0])
    assert t == pytest.approx(-2.1909, abs=1e-4)
    assert p == pytest.approx(0.0710, abs=2e-3)


def test_runs_without_attention_sample_still_plot(tmp_path):
    write_run(str(tmp_path), 'cifar10', 'vit', 0, 0.5, attention=False)
    plot.main(str(tmp_path))
    assert (tmp_path / 'cifar10_val_loss.png').exists() and not (tmp_path / 'cifar10_attention.png').exists()
    row = next(line for line in (tmp_path / 'README.md').read_text().splitlines() if line.startswith('| cifar10_vit'))
    assert row.split(' | ')[4] == '50.00' and row.split(' | ')[6] == '1'  # one seed: the value, no ± 0


@pytest.mark.parametrize('setup,message', [
    (lambda root: None, 'no metrics.json under'),
    (lambda root: (root / 'a').mkdir() or (root / 'a' / 'metrics.json').write_text('{"run": '), 'is not a valid metrics.json'),
    (lambda root: (root / 'a').mkdir() or (root / 'a' / 'metrics.json').write_text('{"run": "x"}'), "missing keys"),
])
def test_empty_or_malformed_folder_is_a_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    proc = subprocess.run([sys.executable, 'plot.py', str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr


def test_missing_folder_is_named_in_the_error(tmp_path):
    missing = str(tmp_path / 'missing')
    proc = subprocess.run([sys.executable, 'plot.py', missing], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(f"error: {missing} is not a folder"), proc.stderr
