"""Synthetic datasets written in the real on-disk formats (IDX, CIFAR-10 python batches), and helpers."""

import atexit
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import read_defaults  # noqa: E402


def train_defaults():
    return read_defaults(os.path.join(ROOT, 'train.py'))


def synthetic_images(n, shape, seed):
    """Class c is a bright 6x6 square at one of 10 places on a dim noisy background: learnable in seconds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, *shape)).astype(np.uint8)
    for c in range(10):
        r, col = 2 + 12 * (c // 5), 2 + 5 * (c % 5)
        images[labels == c, ..., r:r + 6, col:col + 6] = 255
    return images, labels


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    with open(path, 'wb') as f:
        f.write(header + array.tobytes())


def write_mnist_like(root, folder, n_train=12000, n_test=1000):
    raw = os.path.join(root, folder, 'raw')
    os.makedirs(raw, exist_ok=True)
    for prefix, n, seed in [('train', n_train, 0), ('t10k', n_test, 1)]:
        images, labels = synthetic_images(n, (28, 28), seed)
        write_idx(os.path.join(raw, f'{prefix}-images-idx3-ubyte'), images)
        write_idx(os.path.join(raw, f'{prefix}-labels-idx1-ubyte'), labels)


def write_cifar_like(root, per_batch=1200, n_test=1000):
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    for name, n, seed in [(f'data_batch_{i}', per_batch, i) for i in range(1, 6)] + [('test_batch', n_test, 9)]:
        images, labels = synthetic_images(n, (3, 32, 32), seed)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'data': images.reshape(n, -1), 'labels': labels.tolist(), 'batch_label': name}, f)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """Big enough to learn in a few epochs: 7,000 MNIST training images (109 steps of 64 an epoch)."""
    root = str(tmp_path_factory.mktemp('data'))
    write_mnist_like(root, 'MNIST')
    write_mnist_like(root, 'FashionMNIST')
    write_cifar_like(root)
    return root


@pytest.fixture(scope='session')
def small_data_dir(tmp_path_factory):
    """MNIST and CIFAR-10 for runs that need not learn: 640 training images (10 steps of 64), the fixed 5,000
    validation images, 500 test images."""
    root = str(tmp_path_factory.mktemp('small_data'))
    write_mnist_like(root, 'MNIST', n_train=5640, n_test=500)
    write_cifar_like(root, per_batch=1128, n_test=500)
    return root


# a small fast model and schedule for end-to-end runs on the synthetic data
TINY = ['--n_layer=1', '--n_embd=32', '--mlp_dim=64', '--batch_size=64', '--learning_rate=3e-3',
        '--warmup_epochs=0.5', '--log_interval=20', '--device=cpu', '--compile=False']


def train_env():
    """One thread (as the tests time nothing), and downloads that fail at once (proxy to a closed port)."""
    return dict(os.environ, OMP_NUM_THREADS='1', https_proxy='http://127.0.0.1:9', http_proxy='http://127.0.0.1:9')


def run_train(*args, check=True, timeout=300, **kwargs):
    """Runs train.py in a subprocess from the repo root: a fresh interpreter, as a user starts it."""
    proc = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# A process that has imported what every run of train.py or bench.py imports, and forks itself once per run: the
# child is `python <script> <args>` from the repo root, less the seconds of a fresh interpreter (torch, torch._dynamo
# that torch.optim loads at the first optimizer, and a teardown of them at exit). Its standard streams go to files
# (stdout may be a FIFO, read as a pipe), an uncaught SystemExit or exception ends it as the interpreter would (exit
# code, message or traceback on stderr), atexit handlers run, and SIGALRM ends it after `timeout` seconds. The server
# itself never computes, so it holds no OpenMP threads (OMP_NUM_THREADS=1) and forks safely. Requests, one JSON line
# each: ["run", script, args, out, err, timeout] answers the exit code, ["start", ...] the pid at once, ["wait", pid]
# that child's exit code (os.waitstatus_to_exitcode: -N for signal N, as subprocess has it).
FORK_SERVER = r"""
import atexit, json, os, runpy, signal, sys, traceback
if 'OMP_WAIT_POLICY' not in os.environ:  # as train.py and bench.py do before torch loads
    os.environ.setdefault('GOMP_SPINCOUNT', '3000000')
import numpy, torch, torch._dynamo, configurator, data, machine, model


def spawn(script, args, out, err, timeout):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.alarm(max(1, int(timeout)))
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(1 if err == out else os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv, sys.path[0] = [script, *args], os.getcwd()
        try:
            runpy.run_path(script, run_name='__main__')
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


while True:
    request = sys.stdin.readline()
    if not request:
        break
    kind, *rest = json.loads(request)
    pid = rest[0] if kind == 'wait' else spawn(*rest)
    if kind != 'start':
        pid = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(pid, flush=True)
"""
_server = {}
_server_lock = threading.Lock()


def _stop_server():
    proc = _server.pop('proc', None)
    if proc is not None:
        proc.stdin.close()  # the server ends at the end of its input
        proc.wait(timeout=30)


def _ask_server(*request):
    with _server_lock:
        proc = _server.get('proc')
        if proc is None or proc.poll() is not None:
            log = _server['log'] = tempfile.TemporaryFile('w+')  # the server's own stderr, shown if it ends
            env = dict(train_env(), PYTHONUNBUFFERED='1')  # what a child prints reaches a stream at once
            proc = _server['proc'] = subprocess.Popen([sys.executable, '-c', FORK_SERVER], cwd=ROOT, env=env, text=True,
                                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            atexit.register(_stop_server)
        proc.stdin.write(json.dumps(request) + '\n')
        proc.stdin.flush()
        reply = proc.stdout.readline()
    if not reply:
        _server['log'].seek(0)
        raise RuntimeError(f"the fork server ended:\n{_server['log'].read()}")
    return int(reply)


class Forked:
    """`python <script> <args>` started as a fork (FORK_SERVER), with the part of subprocess.Popen's interface the
    tests use: pid, send_signal, kill, wait; stdout a pipe to read as it runs (stream=True, stderr merged into it),
    else the texts of stdout and stderr from communicate() once it ended."""

    def __init__(self, script, *args, stream=False, timeout=300):
        self.tmp = tempfile.TemporaryDirectory()
        self.out, self.err = (os.path.join(self.tmp.name, name) for name in ('stdout', 'stderr'))
        if stream:
            os.mkfifo(self.out)
        self.args, self.returncode, self.stdout = [script, *map(str, args)], None, None
        self.pid = _ask_server('start', script, self.args[1:], self.out, self.out if stream else self.err, timeout)
        if stream:
            self.stdout = open(self.out)  # blocks until the child opens its end

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None):  # the child's own alarm bounds it
        if self.returncode is None:
            self.returncode = _ask_server('wait', self.pid)
            if self.stdout is not None:
                self.stdout.close()
        return self.returncode

    def communicate(self):
        self.wait()
        with open(self.out) as f_out, open(self.err) as f_err:
            return f_out.read(), f_err.read()


def run_forked(script, *args, check=True, timeout=300):
    """Runs `python <script> <args>` from the repo root with run_train's environment, as a fork of a process that has
    imported torch (FORK_SERVER); returns a CompletedProcess."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
        code = _ask_server('run', script, [str(a) for a in args], out, err, timeout)
        with open(out) as f_out, open(err) as f_err:
            result = subprocess.CompletedProcess([script, *args], code, f_out.read(), f_err.read())
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def run_train_fast(*args, check=True, timeout=300):
    """run_train as a fork of a process that has imported torch (run_forked): for the runs that are not about a fresh
    interpreter; signals, kills and concurrent runs take Forked; thread counts and torchrun start real processes."""
    return run_forked('train.py', *args, check=check, timeout=timeout)


def args_for(data_dir, out_dir, *extra):
    return ['config/mnist_vit.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY, *extra]


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope='session')
def vit_run(small_data_dir, tmp_path_factory):
    """One finished 1-epoch config/mnist_vit.py run on small_data_dir (metrics.json, ckpt.pt), shared by the tests
    that read it or start runs against it that must refuse; a test that changes it works on a copy."""
    out_dir = tmp_path_factory.mktemp('vit_run')
    run_train_fast(*args_for(small_data_dir, out_dir, '--epochs=1'))
    return out_dir
