"""Synthetic datasets written in the real on-disk formats (IDX, CIFAR-10 python batches), and helpers."""

import os
import pickle
import subprocess
import sys

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
    root = str(tmp_path_factory.mktemp('data'))
    write_mnist_like(root, 'MNIST')
    write_mnist_like(root, 'FashionMNIST')
    write_cifar_like(root)
    return root


# a small fast model and schedule for end-to-end runs on the synthetic data
TINY = ['--n_layer=1', '--n_embd=32', '--mlp_dim=64', '--batch_size=64', '--learning_rate=3e-3',
        '--warmup_epochs=0.5', '--log_interval=20', '--device=cpu', '--compile=False']


def run_train(*args, check=True, timeout=300, **kwargs):
    """Runs train.py in a subprocess from the repo root; downloads fail at once (proxy to a closed port)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', https_proxy='http://127.0.0.1:9', http_proxy='http://127.0.0.1:9')
    proc = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
