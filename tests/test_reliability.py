"""Nothing lost, clear errors: kills at any moment, the NaN guard, bad checkpoints on resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run_train


def args_for(data_dir, out_dir, *extra):
    return ['config/mnist_vit.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY, *extra]


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope='module')
def checkpointed(data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('ckpt')
    run_train(*args_for(data_dir, out_dir, '--epochs=1'))
    return out_dir


def test_sigkill_at_any_moment_leaves_readable_files(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    cmd = [sys.executable, 'train.py', *args_for(data_dir, tmp_path, '--epochs=20', '--batch_size=512')]
    # with 512-image batches an epoch takes a fraction of a second, so kills land before, during and
    # between checkpoint writes
    for delay in (0.05, 0.13, 0.31, 0.57):
        proc = subprocess.Popen(cmd + (['--init_from=resume'] if (tmp_path / 'ckpt.pt').exists() else []),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if 'epoch' in line and 'done' in line:
                break
        time.sleep(delay)
        proc.kill()
        proc.wait()
        with open(tmp_path / 'metrics.json') as f:
            assert json.load(f)['history']
        assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['state']['epoch'] >= 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, checkpointed, tmp_path):
    # epoch 1 of a 3-epoch run whose weights have blown up: the resumed run must stop in epoch 2
    ckpt = torch.load(checkpointed / 'ckpt.pt', weights_only=True)
    ckpt['config']['epochs'] = 3
    ckpt['model']['head.weight'].fill_(float('inf'))
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    before = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    proc = run_train(*args_for(data_dir, tmp_path, '--epochs=3', '--init_from=resume'), check=False)
    one_line_error(proc, 'non-finite loss at epoch 2, step', 'learning rate', 'ckpt.pt')
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert after['state']['epoch'] == 1
    assert all(torch.equal(after['model'][k], before['model'][k]) for k in before['model'])


def test_resume_without_checkpoint(data_dir, tmp_path):
    proc = run_train(*args_for(data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'no checkpoint at', 'ckpt.pt')


def test_resume_from_corrupt_checkpoint(data_dir, checkpointed, tmp_path):
    data = (checkpointed / 'ckpt.pt').read_bytes()
    (tmp_path / 'ckpt.pt').write_bytes(data[:len(data) // 2])
    proc = run_train(*args_for(data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'cannot load', 'corrupt')


def test_resume_with_a_different_model(data_dir, checkpointed):
    proc = run_train(*args_for(data_dir, checkpointed, '--init_from=resume', '--n_embd=48'), check=False)
    one_line_error(proc, 'was trained with other settings', 'n_embd 32 -> 48')


def test_resume_from_a_foreign_checkpoint(data_dir, tmp_path):
    torch.save({'state_dict': {'w': torch.zeros(2)}}, tmp_path / 'ckpt.pt')  # loads fine, but is not ours
    proc = run_train(*args_for(data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'is not a checkpoint of this project')


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


def test_checkpoint_with_arbitrary_pickled_object_is_refused(data_dir, checkpointed, tmp_path, monkeypatch):
    marker = tmp_path / 'payload-ran'
    monkeypatch.setenv('PAYLOAD_MARKER', str(marker))
    ckpt = torch.load(checkpointed / 'ckpt.pt', weights_only=True)
    ckpt['state']['extra'] = Payload()
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    proc = run_train(*args_for(data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'cannot load')
    assert not marker.exists()


def test_missing_data_offline_names_folder_and_files(tmp_path):
    proc = run_train('config/fashionmnist_vit.py', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}', '--device=cpu',
                     check=False)
    one_line_error(proc, os.path.join(str(tmp_path), 'FashionMNIST/raw'), 'train-images-idx3-ubyte',
                   'Put the files there')
