import gzip
import os
import sys

import pytest
import torch

import data
from conftest import synthetic_images, write_mnist_like
from data import DATASETS, augment_batch, batches, foreground_patches, load_dataset, normalize, read_idx


@pytest.mark.parametrize('name', ['mnist', 'fashionmnist', 'cifar10'])
def test_splits_shapes_dtypes_and_sizes(data_dir, name):
    splits = load_dataset(name, data_dir)
    shape = DATASETS[name]['shape']
    n_train = 12000 if name != 'cifar10' else 6000
    assert len(splits['val'][0]) == 5000
    assert len(splits['train'][0]) == n_train - 5000
    assert len(splits['test'][0]) == 1000
    for x, y in splits.values():
        assert x.dtype == torch.uint8 and x.shape[1:] == shape
        assert y.dtype == torch.int64 and y.shape == (len(x),) and 0 <= y.min() and y.max() < 10


def test_split_is_fixed_and_disjoint(data_dir):
    a, b = load_dataset('mnist', data_dir), load_dataset('mnist', data_dir)
    assert torch.equal(a['val'][0], b['val'][0]) and torch.equal(a['train'][1], b['train'][1])
    # train and val partition the training file: no image appears in both (images are random noise, so unique)
    train_rows = {bytes(r) for r in a['train'][0].flatten(1).numpy()}
    assert not any(bytes(r) in train_rows for r in a['val'][0].flatten(1).numpy())
    # the same split as torch.utils.data.random_split(..., generator=torch.Generator().manual_seed(42))
    full = read_idx(os.path.join(data_dir, 'MNIST/raw/train-images-idx3-ubyte'))
    subsets = torch.utils.data.random_split(range(len(full)), [7000, 5000], generator=torch.Generator().manual_seed(42))
    assert torch.equal(a['val'][0][:, 0], full[list(subsets[1])])


def test_images_and_labels_read_as_written(data_dir):
    splits = load_dataset('cifar10', data_dir)
    images, labels = synthetic_images(1000, (3, 32, 32), 9)
    assert torch.equal(splits['test'][0], torch.from_numpy(images))
    assert torch.equal(splits['test'][1], torch.from_numpy(labels).long())


def test_normalisation():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = normalize(x, 'cifar10')
    assert out.dtype == torch.float32
    mean, std = torch.tensor(DATASETS['cifar10']['mean']), torch.tensor(DATASETS['cifar10']['std'])
    torch.testing.assert_close(out[:, 1], (x[:, 1].float() / 255 - mean[1]) / std[1])
    torch.testing.assert_close(normalize(x.float() / 255, 'cifar10'), out)
    torch.testing.assert_close(normalize(torch.full((1, 1, 2, 2), 0.1307), 'mnist'), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize('policy', ['none', 'flip', 'crop', 'cropflip', 'randaugment'])
def test_augmentation_keeps_shape_range_and_labels(data_dir, policy):
    x, y = load_dataset('cifar10', data_dir)['train']
    x, y = x[:256].float() / 255, y[:256]
    labels_before = y.clone()
    torch.manual_seed(0)
    out = augment_batch(x, policy)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(y, labels_before)
    if policy != 'none':
        changed = (out - x).abs().flatten(1).amax(1) > 1e-6
        assert changed.float().mean() > 0.5  # most images are altered...
        assert not changed.all() or policy in ('cropflip', 'randaugment')
    if policy == 'flip':
        assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(out, x))


def test_random_crop_is_a_shift():
    x = torch.zeros(8, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    out = data.random_crop(x, 2)
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.full((8,), 4.0))  # the square moves, it is not cut


def test_batches_cover_each_index_once_and_shard():
    gen = torch.Generator().manual_seed(0)
    parts = batches(10, 3, generator=gen)
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    shards = [torch.cat(batches(10, 2, generator=torch.Generator().manual_seed(0), rank=r, world_size=2, drop_last=True))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_foreground_patches():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    x[0, 0, :4, 4:] = 255  # the top-right patch of a 2x2 grid
    x[0, 0, 4:, :4] = 10  # a faint bottom-left patch stays background
    assert foreground_patches(x, 4).tolist() == [[False, True, False, False]]


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(name, data_dir):
        raise OSError('network is unreachable')
    monkeypatch.setattr(data, 'download', offline)
    with pytest.raises(FileNotFoundError) as error:
        load_dataset('fashionmnist', str(tmp_path))
    message = str(error.value)
    assert os.path.join(str(tmp_path), 'FashionMNIST/raw') in message
    assert 'train-images-idx3-ubyte' in message and 't10k-labels-idx1-ubyte' in message
    assert 'network is unreachable' in message


def test_gzipped_idx_files_alone_are_decompressed(tmp_path):
    write_mnist_like(str(tmp_path), 'MNIST', n_train=5100, n_test=10)
    raw = tmp_path / 'MNIST' / 'raw'
    expected = load_dataset('mnist', str(tmp_path))
    for path in list(raw.iterdir()):
        with gzip.open(f'{path}.gz', 'wb') as f:
            f.write(path.read_bytes())
        path.unlink()
    got = load_dataset('mnist', str(tmp_path))
    assert all(torch.equal(got[s][i], expected[s][i]) for s in expected for i in (0, 1))
    (raw / 'train-images-idx3-ubyte').unlink()
    (raw / 'train-images-idx3-ubyte.gz').write_bytes(b'not gzip')
    with pytest.raises(FileNotFoundError, match='could not be decompressed.*gunzip -k'):
        load_dataset('mnist', str(tmp_path))


def test_data_errors_name_the_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, 'download', lambda name, data_dir: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(FileNotFoundError, match=f"not in {tmp_path}/nowhere/MNIST/raw/"):
        load_dataset('mnist', 'nowhere')


def test_corrupt_file_is_a_clear_error(tmp_path):
    write_mnist_like(str(tmp_path), 'MNIST', n_train=5100, n_test=10)
    path = tmp_path / 'MNIST/raw/t10k-images-idx3-ubyte'
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match='t10k-images-idx3-ubyte'):
        load_dataset('mnist', str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match=f"known: {', '.join(DATASETS)}"):
        load_dataset('svhn', 'data')


def test_real_mnist_smoke():
    """The real files, from the repo's data/ (as the README has them) or else ../shared/data beside the repo: counts,
    and the published pixel mean."""
    repo = os.path.dirname(os.path.abspath(data.__file__))
    roots = [os.path.join(repo, 'data'), os.path.join(repo, '..', 'shared', 'data')]
    root = next((r for r in roots if os.path.isdir(os.path.join(r, 'MNIST'))), None)
    if root is None:
        pytest.skip('no MNIST in data/ or ../shared/data')
    splits = load_dataset('mnist', root)
    assert [len(splits[s][0]) for s in ('train', 'val', 'test')] == [55000, 5000, 10000]
    x = torch.cat([splits['train'][0], splits['val'][0]]).float() / 255
    assert x.mean().item() == pytest.approx(0.1307, abs=1e-4)


def test_a_torchvision_that_does_not_match_torch_is_one_clear_line(tmp_path, monkeypatch):
    """A CPU torch beside a CUDA torchvision fails at import ("operator torchvision::nms does not exist"): the error
    says so, with the versions, not as a failed download; and, as every missing-data error, names the files and
    where to put them."""
    class BrokenTorchvision:
        def find_spec(self, name, path=None, target=None):
            if name == 'torchvision':
                raise RuntimeError('operator torchvision::nms does not exist')

    monkeypatch.delitem(sys.modules, 'torchvision', raising=False)
    monkeypatch.setattr(sys, 'meta_path', [BrokenTorchvision()] + sys.meta_path)
    with pytest.raises(FileNotFoundError) as e:
        load_dataset('mnist', str(tmp_path))
    message = str(e.value)
    assert 'cannot be downloaded: torchvision' in message and f'beside torch {torch.__version__}' in message
    assert 'operator torchvision::nms does not exist' in message and 'must come from the same index' in message
    assert 'downloading it failed' not in message and '\n' not in message
    assert f"not in {tmp_path}/MNIST/raw/ (expected files: train-images-idx3-ubyte, train-labels-idx1-ubyte, " \
           "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)" in message
    assert 'Put the files there, or point --data_dir at a folder that has them' in message
