"""Nothing lost, clear errors: kills at any moment, the NaN guard, bad checkpoints on resume."""

import json
import re
import signal
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, Forked, args_for, one_line_error, run_train_fast, train_env


@pytest.fixture
def checkpointed(vit_run):
    """A finished 1-epoch run on small_data_dir (conftest's vit_run, shared with test_runs: never changed here)."""
    return vit_run


def test_sigkill_at_any_moment_leaves_readable_files(small_data_dir, tmp_path):
    args = args_for(small_data_dir, tmp_path, '--epochs=20', '--batch_size=512')
    # 640 training images in 512-image batches: an epoch is one step, the validation pass and two checkpoint writes
    # (a fraction of a second), so kills land before, during and between checkpoint writes
    for delay in (0.05, 0.13, 0.31, 0.57):
        proc = Forked('train.py', *args, *(['--init_from=resume'] if (tmp_path / 'ckpt.pt').exists() else []),
                      stream=True)
        for line in proc.stdout:  # an epoch's end once a first checkpoint is there: a kill never finds nothing
            if 'epoch' in line and 'done' in line and (tmp_path / 'metrics.json').exists():
                break
        time.sleep(delay)
        proc.kill()
        proc.wait()
        with open(tmp_path / 'metrics.json') as f:
            assert json.load(f)['history']
        assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['state']['epoch'] >= 1


@pytest.mark.parametrize('stderr', ['terminal', 'into the pipe'])
def test_ctrl_c_behind_a_pipe_saves_and_resumes(data_dir, tmp_path, stderr):
    """`python train.py ... | tee log` (or `2>&1 | tee log`), then Ctrl-C: the shell's SIGINT ends tee too, so the
    run's next line meets a closed pipe. The run saves and exits as Ctrl-C does without a pipe, and resumes; its
    lines go on to stderr while that is open. A fresh interpreter, whose flush of stdout at exit must not fail (exit
    120) either; no PYTHONUNBUFFERED: the lines reach the pipe as they come, as tee shows them."""
    args = args_for(data_dir, tmp_path, '--epochs=3', '--log_interval=1')
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if stderr == 'terminal' else subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if '| step ' in line:  # the first progress line
            break
    proc.stdout.close()  # tee is gone
    proc.send_signal(signal.SIGINT)
    errors = proc.stderr.read() if proc.stderr else ''
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, errors
    assert 'Traceback' not in errors and 'Exception ignored' not in errors
    if stderr == 'terminal':
        assert 'interrupted (SIGINT) at epoch 1' in errors and '--init_from=resume' in errors
    stopped = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['state']
    assert 0 < stopped['step'] < 3 * (7000 // 64)
    proc = run_train_fast(*args, '--init_from=resume')
    assert 'resuming' in proc.stdout
    with open(tmp_path / 'metrics.json') as f:
        metrics = json.load(f)
    assert len(metrics['history']) == 3 and metrics['test'] is not None


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_data_dir, checkpointed, tmp_path):
    # epoch 1 of a 3-epoch run whose weights have blown up: the resumed run must stop in epoch 2
    ckpt = torch.load(checkpointed / 'ckpt.pt', weights_only=True)
    ckpt['config']['epochs'] = 3
    ckpt['model']['head.weight'].fill_(float('inf'))
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    before = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--epochs=3', '--init_from=resume'), check=False)
    one_line_error(proc, 'non-finite loss at epoch 2, step', 'learning rate', 'ckpt.pt')
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert after['state']['epoch'] == 1
    assert all(torch.equal(after['model'][k], before['model'][k]) for k in before['model'])
    # the failure is a result: metrics.json records it, and a queue never retries it silently
    with open(tmp_path / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['test'] is None and len(metrics['failures']) == 1
    assert metrics['failures'][0].startswith('non-finite loss at epoch 2, step')
    queue = tmp_path / 'queue.txt'
    queue.write_text(f"{tmp_path} {' '.join(args_for(small_data_dir, tmp_path, '--epochs=3')[:1])}\n")
    proc = subprocess.run(['bash', 'queue.sh', str(queue)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert 'skipped, it failed before' in proc.stdout and 'train.py' not in proc.stdout


def test_resume_without_checkpoint(small_data_dir, tmp_path):
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'no checkpoint at', 'ckpt.pt')


def test_resume_from_corrupt_checkpoint(small_data_dir, checkpointed, tmp_path):
    data = (checkpointed / 'ckpt.pt').read_bytes()
    (tmp_path / 'ckpt.pt').write_bytes(data[:len(data) // 2])
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'cannot load', 'corrupt')


def test_resume_with_a_different_model(small_data_dir, checkpointed):
    proc = run_train_fast(*args_for(small_data_dir, checkpointed, '--init_from=resume', '--n_embd=48'), check=False)
    one_line_error(proc, 'was trained with other settings', 'n_embd 32 -> 48')


def test_resume_from_a_foreign_checkpoint(small_data_dir, tmp_path):
    torch.save({'state_dict': {'w': torch.zeros(2)}}, tmp_path / 'ckpt.pt')  # loads fine, but is not ours
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'is not a checkpoint of this project')


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


def test_checkpoint_with_arbitrary_pickled_object_is_refused(small_data_dir, checkpointed, tmp_path, monkeypatch):
    marker = tmp_path / 'payload-ran'
    monkeypatch.setenv('PAYLOAD_MARKER', str(marker))
    ckpt = torch.load(checkpointed / 'ckpt.pt', weights_only=True)
    ckpt['state']['extra'] = Payload()
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    proc = run_train_fast(*args_for(small_data_dir, tmp_path, '--init_from=resume'), check=False)
    one_line_error(proc, 'cannot load')
    assert not marker.exists()


def test_missing_data_offline_names_folder_and_files(tmp_path):
    proc = run_train_fast('config/fashionmnist_vit.py', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}',
                          '--device=cpu', check=False)
    one_line_error(proc, os.path.join(str(tmp_path), 'FashionMNIST/raw'), 'train-images-idx3-ubyte',
                   'Put the files there')


@pytest.mark.parametrize('case', ['missing data', 'resume of nothing', 'bad flag'])
def test_a_run_that_cannot_start_leaves_no_folder(small_data_dir, tmp_path, case):
    out_dir = tmp_path / 'out' / 'mnist_vit' / 'seed3'
    args = {'missing data': args_for(tmp_path / 'nowhere', out_dir),
            'resume of nothing': args_for(small_data_dir, out_dir, '--init_from=resume'),
            'bad flag': args_for(small_data_dir, out_dir, '--learning_rate=-1')}[case]
    proc = run_train_fast(*args, check=False)
    assert proc.returncode != 0
    assert not (tmp_path / 'out').exists()  # not even out/


def test_a_gpu_config_on_a_cpu_says_so_and_how_long_it_takes(data_dir, tmp_path):
    proc = Forked('train.py', 'config/cifar10_diff.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
                  '--device=cpu', '--batch_size=16', '--log_interval=1', stream=True)
    output = []
    for line in proc.stdout:  # the first progress line, then stop it (it saves and exits)
        output.append(line)
        if 'epochs take' in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = ''.join(output) + proc.stdout.read()
    proc.wait()
    assert 'is a GPU config; on a CPU run config/cifar10_small_*.py' in output
    assert re.search(r'note: at this rate all 200 epochs take (\d+h\d\dm|\d+m\d\ds)', output)
