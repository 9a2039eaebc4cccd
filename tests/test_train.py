import json
import os
import re
import signal
import struct
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from machine import cpu_name
from conftest import ROOT, TINY, Forked, args_for, one_line_error, run_forked, run_train, run_train_fast
from data import load_dataset, normalize
from model import ViT, ViTConfig

HISTORY_KEYS = {'epoch', 'step', 'lr', 'train_loss', 'train_acc', 'train_clean_acc', 'val_loss', 'val_acc', 'time_s',
                'peak_mem_mb'}


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def finished_run(data_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('run'))
    proc = run_train_fast('config/mnist_diff.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--epochs=3', *TINY)
    return out_dir, proc


def test_run_learns_and_writes_valid_metrics(finished_run):
    out_dir, proc = finished_run
    m = read_metrics(out_dir)
    assert m['run'] == 'mnist_diff' and m['seed'] == 0 and m['dataset'] == 'mnist'
    assert m['config']['epochs'] == 3 and m['config']['attention'] == 'diff' and m['config']['n_embd'] == 32
    assert m['params'] > 0 and f"{m['params']:,} parameters" in proc.stdout
    assert [h['epoch'] for h in m['history']] == [1, 2, 3]
    assert all(set(h) == HISTORY_KEYS | {'lambda'} for h in m['history'])  # λ per layer: a diff run
    assert all(0 <= h[k] <= 1 for h in m['history'] for k in ('train_acc', 'train_clean_acc', 'val_acc'))
    assert all(h['peak_mem_mb'] > 0 for h in m['history'])
    assert m['history'][-1]['val_loss'] < m['history'][0]['val_loss']
    assert m['best_val_loss'] == min(h['val_loss'] for h in m['history'])
    assert m['test']['acc'] > 0.9  # ten classes: chance is 0.1
    assert 0 < m['attn_focus'] <= 1
    assert m['train_time_s'] > 0 and m['images_per_s'] > 0 and m['device'] == 'cpu' and m['torch'] == torch.__version__
    assert m['cpu'] == [cpu_name()] and torch.backends.cpu.get_cpu_capability() in m['cpu'][0]  # what its timings ran on
    assert 'img/s' in proc.stdout and 'val loss' in proc.stdout and 'clean train acc' in proc.stdout
    assert re.search(r'\| ETA (\d+h\d\dm|\d+m\d\ds|\d+s)\n', proc.stdout)  # hours and minutes, not 169794s
    assert torch.load(os.path.join(out_dir, 'model.pt'), weights_only=True).keys() == ViT(
        ViTConfig(n_layer=1, n_embd=32, mlp_dim=64)).state_dict().keys()
    assert set(m['outliers']) == {'attn_logits', 'activations'}
    assert all(o['top1'] >= o['top10'] >= o['median'] > 0 for o in m['outliers'].values())
    assert 'noise' not in m  # the slow analysis runs only when asked for (--analyses)


def test_analyses_choose_what_ends_a_run(small_data_dir, tmp_path):
    """The test set always; the others as --analyses names them; a bad name is one line before anything slow."""
    run_train_fast('config/mnist_vit.py', f'--data_dir={small_data_dir}', f'--out_dir={tmp_path / "none"}',
                   '--epochs=1', '--analyses=', *TINY)
    m = read_metrics(tmp_path / 'none')
    assert m['test']['acc'] > 0 and not {'outliers', 'noise'} & set(m) and not (tmp_path / 'none' / 'attention.npz').exists()
    run_train_fast('config/mnist_vit.py', f'--data_dir={small_data_dir}', f'--out_dir={tmp_path / "noise"}',
                   '--epochs=1', '--analyses=noise', *TINY)
    m = read_metrics(tmp_path / 'noise')
    assert m['noise']['clean'] == m['test']['acc'] and 'outliers' not in m
    proc = run_forked('train.py', 'config/mnist_vit.py', f'--out_dir={tmp_path / "bad"}', '--analyses=test,speed',
                      check=False)
    one_line_error(proc, 'unknown analysis speed')
    assert not (tmp_path / 'bad').exists()


def test_outliers_are_the_exact_top_values_and_median(small_data_dir, tmp_path):
    """metrics.json's outliers against a direct computation over the whole test set (float32, so both agree)."""
    run_train_fast('config/mnist_diff.py', f'--data_dir={small_data_dir}', f'--out_dir={tmp_path}', '--epochs=1',
                   '--dtype=float32', *TINY)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    model = ViT(ViTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    x = normalize(load_dataset('mnist', small_data_dir)['test'][0], 'mnist')
    with torch.no_grad():
        logits, activations = (torch.cat([a.abs().flatten() for a in values]) for values in zip(*model.eval().activations(x)))
    for key, values in (('attn_logits', logits), ('activations', activations)):
        got = read_metrics(tmp_path)['outliers'][key]
        top = values.topk(10).values
        assert got['top1'] == pytest.approx(top[0].item(), rel=1e-4) and got['top10'] == pytest.approx(top[9].item(), rel=1e-4)
        assert got['median'] == pytest.approx(values.median().item(), rel=5e-3)  # histogram bins of 0.23%


def test_attention_sample_is_small_and_complete(finished_run):
    out_dir, _ = finished_run
    path = os.path.join(out_dir, 'attention.npz')
    assert os.path.getsize(path) < 1_000_000
    sample = np.load(path)
    assert sample['images'].shape == (16, 1, 28, 28) and sample['images'].dtype == np.uint8
    assert sample['labels'].shape == (16,)
    assert sample['cls_attn'].shape == (1, 16, 1, 49)  # layers, images, heads, patches
    assert int(sample['patch_size']) == 4


def test_resuming_a_finished_run_says_so_and_trains_nothing(finished_run, data_dir):
    out_dir, _ = finished_run
    before = read_metrics(out_dir)
    proc = run_train_fast('config/mnist_diff.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                          '--init_from=resume', '--epochs=3', *TINY)
    assert 'is finished (3 of 3 epochs): nothing to train; evaluating it again' in proc.stdout
    assert 'resuming' not in proc.stdout and 'epoch 4' not in proc.stdout
    after = read_metrics(out_dir)
    assert after['history'] == before['history'] and after['test'] == before['test']


def interrupt_after(args, line, sig=signal.SIGTERM, forked=False):
    """Starts train.py (forked=True: as a fork, conftest's Forked), sends `sig` once it prints a line containing
    `line`, returns (exit code, output)."""
    if forked:
        proc = Forked('train.py', *args, stream=True)
    else:
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    output = []
    for text in proc.stdout:
        output.append(text)
        if line in text:
            proc.send_signal(sig)
            break
    output.append(proc.stdout.read())
    return proc.wait(timeout=120), ''.join(output)


def without_measurements(history):
    # wall-clock time and memory high-water mark differ between two runs of the same training; the rest must not
    return [{k: v for k, v in h.items() if k not in ('time_s', 'peak_mem_mb')} for h in history]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_result(finished_run, data_dir, tmp_path, sig):
    out_dir, _ = finished_run
    args = ['config/mnist_diff.py', f'--data_dir={data_dir}', '--epochs=3', *TINY]
    code, output = interrupt_after([*args, f'--out_dir={tmp_path}'], 'epoch 1/3 done', sig, forked=True)
    assert code == 128 + sig, output
    assert f"Resume with: python train.py" in output and '--init_from=resume' in output
    stopped = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['state']
    assert stopped['epoch'] == 1 and stopped['batch'] > 0  # stopped inside epoch 2, after a finished step
    assert len(read_metrics(tmp_path)['history']) == 1
    proc = run_train_fast(*args, f'--out_dir={tmp_path}', '--init_from=resume')
    assert 'resuming' in proc.stdout
    resumed, full = read_metrics(tmp_path), read_metrics(out_dir)
    assert without_measurements(resumed['history']) == without_measurements(full['history'])
    assert resumed['test'] == full['test'] and resumed['attn_focus'] == full['attn_focus']


def test_data_parallel_two_cpu_ranks(data_dir, tmp_path):
    """torchrun with 2 gloo ranks: each trains on its shard; rank 0 alone writes; the run learns. The launcher
    (`python -m torch.distributed.run`, run as its file) is forked; the ranks it starts are fresh interpreters."""
    torchrun = os.path.join(os.path.dirname(torch.__file__), 'distributed', 'run.py')
    proc = run_forked(torchrun, '--standalone', '--nproc_per_node=2', 'train.py',
                      'config/mnist_vit.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path}', '--epochs=2', *TINY,
                      check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = read_metrics(tmp_path)
    assert m['world_size'] == 2 and m['config']['batch_size'] == 64
    assert [h['epoch'] for h in m['history']] == [1, 2]
    # 7,000 training images, global batch 64 (32 per rank): 109 steps per epoch, the same as one process
    assert m['history'][-1]['step'] == 2 * (7000 // 64)
    assert m['test']['acc'] > 0.9
    assert proc.stdout.count('epoch 2/2 done') == 1  # only rank 0 prints


def wandb_records(run_dir):
    """{record type: [records]} of an offline W&B run's transaction log, run-<id>.wandb (what `wandb sync` uploads):
    a 7-byte header, then 32 KiB blocks of chunks (crc32c, length, type: 1 a whole record, 2-4 its first, middle and
    last part; a block's tail under 7 bytes is padding), the records wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2
    (path,) = run_dir.glob('run-*.wandb')
    raw = path.read_bytes()
    assert raw[:4] == b':W&B'
    records, data, pos = defaultdict(list), b'', 7
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack('<HB', raw[pos + 4:pos + 7])
        data, pos = data + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            records[record.WhichOneof('record_type')].append(record)
            data = b''
    return records


def test_wandb_log_records_the_config_progress_lines_epochs_and_analyses(small_data_dir, tmp_path, monkeypatch):
    """--wandb_log=True with the real package, offline: the run's own file holds the config, every progress line's
    loss, learning rate and img/s, every epoch's row as metrics.json has it, and the final analyses."""
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    run_train(*args_for(small_data_dir, tmp_path / 'run', '--epochs=2', '--log_interval=4', '--wandb_log=True', '--analyses=all'))
    metrics = read_metrics(tmp_path / 'run')
    (run_dir,) = (tmp_path / 'wandb').glob('offline-run-*')
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records['run']]
    assert run.display_name == 'mnist_vit_seed0' and run.project == 'nanodiffvision'
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: config[k] for k in metrics['config']} == metrics['config']
    assert config['params'] == metrics['params'] and config['precision'] == metrics['precision']
    rows = [{item.key or '.'.join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records['history']]
    progress = [r for r in rows if 'loss' in r]  # 10 steps an epoch, a line every 4
    assert [r['_step'] for r in progress] == [4, 8, 12, 16, 20]
    assert all(r['loss'] > 0 and r['img_per_s'] > 0 and 0 < r['lr'] <= 3e-3 for r in progress)
    assert [{k: r[k] for k in HISTORY_KEYS} for r in rows if 'val_acc' in r] == metrics['history']
    summary = {item.key or '.'.join(item.nested_key): json.loads(item.value_json) for r in records['summary']
               for item in r.summary.update}
    for key in ('test', 'attn_focus', 'outliers', 'noise'):
        assert summary[key] == metrics[key], key


def test_wandb_log_without_the_package_is_one_line_before_anything_slow(small_data_dir, tmp_path, monkeypatch):
    hidden = tmp_path / 'no_wandb'  # wandb as an environment without it has it
    hidden.mkdir()
    (hidden / 'wandb.py').write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    monkeypatch.setenv('PYTHONPATH', str(hidden))
    proc = run_train(*args_for(small_data_dir, tmp_path / 'run', '--wandb_log=True'), check=False)
    line = one_line_error(proc)
    assert line == 'error: wandb_log=True needs the wandb package: pip install wandb'
    assert 'train /' not in proc.stdout and not (tmp_path / 'run').exists()  # before the data, and no folder left
