"""
Datasets held whole in memory as uint8 tensors on the training device: at most 180 MB, so every epoch is
a permutation of indices and every batch a gather, with no DataLoader workers and no PIL.
Normalisation, augmentation and the test-time corruptions run batch-wise on the device.
"""

import gzip
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

# one entry per dataset; adding a dataset is adding an entry (and, for a new file format, a reader).
# foreground: whether dark-background "ink" patches are meaningful, i.e. whether attention focus is measured;
# corruptions: the test-time corruptions of eval.py (CORRUPTIONS below)
DATASETS = {
    'mnist': dict(
        folder='MNIST/raw', format='idx', shape=(1, 28, 28), num_classes=10, num_val=5000,
        mean=(0.1307,), std=(0.3081,), torchvision_class='MNIST', foreground=True,
        corruptions=('gaussian', 'occlusion', 'distractors'),
        train=('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
        test=('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')),
    # MNIST's digits on a 40 x 40 canvas among 4-8 fragments of other digits (cluttered_mnist below); attention focus
    # is the share of attention on the digit's own box
    'mnist_cluttered': dict(
        folder='MNIST/raw', format='idx', file_shape=(1, 28, 28), shape=(1, 40, 40), num_classes=10, num_val=5000,
        mean=(0.1330,), std=(0.3132,), torchvision_class='MNIST', foreground=True, fragments=(4, 8),
        corruptions=('gaussian', 'occlusion', 'distractors'),
        train=('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
        test=('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')),
    'fashionmnist': dict(
        folder='FashionMNIST/raw', format='idx', shape=(1, 28, 28), num_classes=10, num_val=5000,
        mean=(0.5,), std=(0.5,), torchvision_class='FashionMNIST', foreground=True,
        corruptions=('gaussian', 'occlusion', 'distractors'),
        train=('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
        test=('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')),
    'cifar10': dict(
        folder='cifar-10-batches-py', format='cifar', shape=(3, 32, 32), num_classes=10, num_val=5000,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), torchvision_class='CIFAR10', foreground=False,
        corruptions=('gaussian', 'occlusion', 'distractors', 'blur', 'contrast'),
        train=tuple(f'data_batch_{i}' for i in range(1, 6)), test=('test_batch',)),
}
# cluttered MNIST on a 56 x 56 canvas (196 patches of 4 x 4), with as many fragments per area: 8-16
DATASETS['mnist_cluttered56'] = dict(DATASETS['mnist_cluttered'], shape=(1, 56, 56), mean=(0.1071,), std=(0.2859,),
                                     fragments=(8, 16))
# and on an 80 x 80 canvas (400 patches), 16-32 fragments: a GPU run (queue/gpu.txt)
DATASETS['mnist_cluttered80'] = dict(DATASETS['mnist_cluttered'], shape=(1, 80, 80), mean=(0.0909,), std=(0.2661,),
                                     fragments=(16, 32))
SPLIT_SEED = 42  # the train/val split is the same for every run and every seed
# a patch is foreground ("ink") when its raw mean pixel value exceeds this fraction of 255; used by the
# attention-focus measure on MNIST and FashionMNIST (black backgrounds, bright objects)
FOREGROUND_THRESHOLD = 0.1


def read_idx(path):
    with open(path, 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 0x08 or data.size != math.prod(dims):
        raise ValueError(f"{path} is not a uint8 IDX file of shape {dims} (truncated or corrupt?)")
    return torch.from_numpy(data.reshape(dims).copy())


def read_cifar_batch(path):
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    images = torch.from_numpy(np.asarray(batch['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.tensor(batch['labels'], dtype=torch.int64)


def read_split(spec, root, files):
    if spec['format'] == 'idx':
        images, labels = read_idx(os.path.join(root, files[0])), read_idx(os.path.join(root, files[1]))
        images, labels = images.unsqueeze(1), labels.long()
    else:
        images, labels = zip(*[read_cifar_batch(os.path.join(root, f)) for f in files])
        images, labels = torch.cat(images), torch.cat(labels)
    shape = spec.get('file_shape', spec['shape'])
    if images.shape[1:] != shape or len(images) != len(labels):
        raise ValueError(f"{root}: images of shape {tuple(images.shape)} with {len(labels)} labels, "
                         f"expected (N, {', '.join(map(str, shape))}) with N labels")
    return images, labels


def gunzip_missing(root, files):
    """Decompresses FILE.gz to FILE where only the gzipped file is there (MNIST's distribution format), as
    torchvision's downloader does."""
    for name in files:
        path = os.path.join(root, name)
        if os.path.exists(path) or not os.path.exists(path + '.gz'):
            continue
        try:
            with gzip.open(path + '.gz') as src, open(path + '.tmp', 'wb') as dst:
                dst.write(src.read())
            os.replace(path + '.tmp', path)
        except (OSError, EOFError) as e:
            raise FileNotFoundError(f"{path}.gz could not be decompressed to {path} ({e}); "
                                    f"decompress it yourself: gunzip -k {path}.gz") from None


def import_torchvision():
    """torchvision, or one clear error where it does not match torch: a CPU torch beside a CUDA torchvision (pip pairs
    them when one index is unreachable) fails with "operator torchvision::nms does not exist"."""
    try:
        import torchvision
    except Exception as e:
        from importlib.metadata import version
        raise ImportError(f"torchvision {version('torchvision')} does not load beside torch {torch.__version__} "
                          f"({type(e).__name__}: {str(e).splitlines()[0]}): torch and torchvision must come from the "
                          "same index, e.g. pip install torch torchvision --index-url "
                          "https://download.pytorch.org/whl/cpu") from None
    return torchvision


def download(name, data_dir):
    """Fetches the dataset with torchvision's checksummed downloader, into the layout read_split expects."""
    torchvision = import_torchvision()
    getattr(torchvision.datasets, DATASETS[name]['torchvision_class'])(data_dir, train=True, download=True)


def load_dataset(name, data_dir, device='cpu'):
    """Returns {'train': (x, y), 'val': (x, y), 'test': (x, y)}: uint8 images (N, C, H, W), int64 labels."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = os.path.abspath(os.path.join(data_dir, spec['folder']))
    expected = spec['train'] + spec['test']
    gunzip_missing(root, expected)
    if not all(os.path.exists(os.path.join(root, f)) for f in expected):
        missing = f"{name} is not in {root}/ (expected files: {', '.join(expected)})"
        put = "Put the files there, or point --data_dir at a folder that has them"
        try:
            download(name, data_dir)
        except ImportError as e:  # not a download problem: say what is wrong with the installation
            raise FileNotFoundError(f"{missing}. {put}; they cannot be downloaded: {e}") from None
        except Exception as e:
            reason = ' '.join(str(e).split())  # torchvision's messages span lines
            raise FileNotFoundError(f"{missing} and downloading it failed ({type(e).__name__}: {reason}). {put}, or "
                                    "run once with network access.") from None
    x_train, y_train = read_split(spec, root, spec['train'])
    x_test, y_test = read_split(spec, root, spec['test'])
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = perm[:len(x_train) - spec['num_val']], perm[len(x_train) - spec['num_val']:]
    if 'fragments' in spec:  # cluttered: each canvas from the digits of its own file, test from t10k
        canvas = dict(canvas=spec['shape'][-1], fragments=spec['fragments'])
        (x_train, train_boxes), (x_test, test_boxes) = (cluttered_mnist(x_train, 0, **canvas),
                                                        cluttered_mnist(x_test, 1, **canvas))
        boxes = {'train': train_boxes[train_idx], 'val': train_boxes[val_idx], 'test': test_boxes}
    splits = {'train': (x_train[train_idx], y_train[train_idx]),
              'val': (x_train[val_idx], y_train[val_idx]),
              'test': (x_test, y_test)}
    splits = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
    if 'fragments' in spec:
        splits['boxes'] = {k: b.to(device) for k, b in boxes.items()}
    return splits


CLUTTER_SEED = 7  # with the file (0: train, 1: t10k), fixes every canvas


def cluttered_mnist(digits, file_index, canvas=40, fragment=8, fragments=(4, 8)):
    """
    Cluttered MNIST (Mnih et al. 2014, "Recurrent Models of Visual Attention"): each 28 x 28 digit at a random place
    on a canvas x canvas field, over 4 to 8 fragments of fragment x fragment pixels cut from the centres of other
    digits of the same file, placed at random; pixels combine by maximum. The same for every run (CLUTTER_SEED).
    Returns the uint8 canvases (N, 1, canvas, canvas) and each digit's box, the bounding box of its ink on the
    canvas: (N, 4) int64 rows [top, left, bottom, right), bottom and right exclusive.
    """
    rng = np.random.default_rng([CLUTTER_SEED, file_index])
    src = digits[:, 0].numpy()
    n, size = len(src), src.shape[-1]
    out = np.zeros((n, canvas, canvas), dtype=np.uint8)
    rows = np.arange(n)[:, None, None]
    span = np.arange(fragment)
    count = rng.integers(fragments[0], fragments[1] + 1, n)
    for j in range(fragments[1]):
        other = (np.arange(n) + rng.integers(1, n, n)) % n  # never the image's own digit
        sy, sx = rng.integers(4, size - fragment - 4 + 1, (2, n))  # from the digit's centre, where the ink is
        cy, cx = rng.integers(0, canvas - fragment + 1, (2, n))
        piece = src[other[:, None, None], (sy[:, None] + span)[:, :, None], (sx[:, None] + span)[:, None, :]]
        piece = piece * (j < count)[:, None, None].astype(np.uint8)
        at = (rows, (cy[:, None] + span)[:, :, None], (cx[:, None] + span)[:, None, :])
        out[at] = np.maximum(out[at], piece)
    py, px = rng.integers(0, canvas - size + 1, (2, n))
    span = np.arange(size)
    at = (rows, (py[:, None] + span)[:, :, None], (px[:, None] + span)[:, None, :])
    out[at] = np.maximum(out[at], src)
    ink_rows, ink_cols = src.any(axis=2), src.any(axis=1)  # (N, 28) each
    top, bottom = ink_rows.argmax(1), size - ink_rows[:, ::-1].argmax(1)
    left, right = ink_cols.argmax(1), size - ink_cols[:, ::-1].argmax(1)
    boxes = np.stack([py + top, px + left, py + bottom, px + right], axis=1)
    return torch.from_numpy(out).unsqueeze(1), torch.from_numpy(boxes).long()


def normalize(x, name):
    """uint8 (or float in [0, 1]) images -> float32 normalised with the dataset's mean and std."""
    spec = DATASETS[name]
    mean = torch.tensor(spec['mean'], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec['std'], device=x.device).view(1, -1, 1, 1)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return (x - mean) / std


def batches(n, batch_size, device='cpu', generator=None, rank=0, world_size=1, drop_last=False):
    """Index tensors on the device covering range(n), shuffled when a generator is given; with
    world_size > 1 each rank gets its own shard of the same permutation."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if drop_last:  # every rank then gets the same number of full batches
        order = order[:n // (batch_size * world_size) * batch_size * world_size]
    return order[rank::world_size].to(device).split(batch_size)


def foreground_patches(x, patch_size):
    """uint8 images (B, C, H, W) -> (B, num_patches) bool: patches whose mean pixel exceeds the threshold,
    in the same row-major order as the patch embedding."""
    means = F.avg_pool2d(x.float().mean(dim=1, keepdim=True), patch_size).flatten(1)
    return means > FOREGROUND_THRESHOLD * 255


def box_patches(boxes, image_size, patch_size):
    """Boxes (B, 4) [top, left, bottom, right) in pixels -> (B, num_patches) bool: patches whose centre lies in the
    box, in the patch embedding's row-major order."""
    centres = torch.arange(image_size // patch_size, device=boxes.device) * patch_size + (patch_size - 1) / 2
    inside_rows = (centres >= boxes[:, 0:1]) & (centres < boxes[:, 2:3])  # (B, grid)
    inside_cols = (centres >= boxes[:, 1:2]) & (centres < boxes[:, 3:4])
    return (inside_rows[:, :, None] & inside_cols[:, None, :]).flatten(1)


# -----------------------------------------------------------------------------
# training augmentation, batch-wise on the device; images are float in [0, 1]

def random_crop(x, padding):
    """Zero-pads by `padding` and crops back to size at a random offset per image."""
    B, C, H, W = x.shape
    x = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (B, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (B, 1), device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(W, device=x.device))[:, None, None, :]
    return x[torch.arange(B, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None], rows, cols]


def random_flip(x):
    flip = torch.rand(x.size(0), 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def grayscale(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.size(1) == 3 else x


def blend(a, b, factor):
    return (b + factor * (a - b)).clamp(0, 1)  # factor 1 -> a, 0 -> b, as PIL's ImageEnhance


def autocontrast(x):
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-5), x)


def sharpen(x, factor):
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), kernel.expand(x.size(1), 1, 3, 3), groups=x.size(1))
    return blend(x, smooth, factor)


def affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode='zeros')


def rand_augment(x, num_ops=2, magnitude=10):
    """
    A batch-wise RandAugment (Cubuk et al. 2019) with torchvision's 31-bin magnitude scale: each image gets
    `num_ops` ops drawn uniformly from 14 (identity, autocontrast, equalize-like contrast stretch, brightness,
    color, contrast, sharpness, posterize, solarize, rotate, shear x/y, translate x/y), with random sign.
    Every op is computed for the whole batch and selected per image with torch.where, so nothing syncs.
    """
    B, device = x.size(0), x.device
    m = magnitude / 30
    for _ in range(num_ops):
        op = torch.randint(0, 14, (B, 1, 1, 1), device=device)
        sign = torch.where(torch.rand(B, 1, 1, 1, device=device) < 0.5, -1.0, 1.0)
        factor = 1 + sign * 0.9 * m
        gray_mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        bits = 8 - int(4 * m)
        candidates = [
            x,
            autocontrast(x),
            autocontrast(x).sqrt(),  # equalize stand-in: stretches and lifts dark tones
            blend(x, torch.zeros_like(x), factor),  # brightness
            blend(x, grayscale(x).expand_as(x), factor),  # color (saturation)
            blend(x, gray_mean.expand_as(x), factor),  # contrast
            sharpen(x, factor),
            torch.floor(x * 255 / 2 ** (8 - bits)) * 2 ** (8 - bits) / 255,  # posterize
            torch.where(x >= 1 - m, 1 - x, x),  # solarize
        ]
        # the geometric ops share one grid_sample: an identity matrix per image, changed where chosen
        s = sign.view(B)
        angle = s * math.radians(30 * m)
        theta = torch.zeros(B, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        o = op.view(B)
        rot = o == 9
        theta[:, 0, 0] = torch.where(rot, torch.cos(angle), theta[:, 0, 0])
        theta[:, 0, 1] = torch.where(rot, -torch.sin(angle), 0.0)
        theta[:, 1, 0] = torch.where(rot, torch.sin(angle), 0.0)
        theta[:, 1, 1] = torch.where(rot, torch.cos(angle), theta[:, 1, 1])
        theta[:, 0, 1] += torch.where(o == 10, s * 0.3 * m, 0.0)  # shear x
        theta[:, 1, 0] += torch.where(o == 11, s * 0.3 * m, 0.0)  # shear y
        shift = s * 2 * (150 / 331) * m  # torchvision translates by up to 150/331 of the size
        theta[:, 0, 2] = torch.where(o == 12, shift, 0.0)
        theta[:, 1, 2] = torch.where(o == 13, shift, 0.0)
        geometric = affine(x, theta)
        out = geometric
        for i, candidate in enumerate(candidates):
            out = torch.where(op == i, candidate, out)
        x = out
    return x


AUGMENTATIONS = ('none', 'flip', 'crop', 'cropflip', 'randaugment')


def augment_batch(x, policy):
    """Training augmentation of float images in [0, 1]; policy is one of AUGMENTATIONS."""
    if policy == 'flip':
        return random_flip(x)  # for FashionMNIST: clothes are left-right symmetric, digits are not
    if policy == 'crop':
        return random_crop(x, 2)  # shifts of up to 2 pixels: digits and clothes must not be flipped
    if policy == 'cropflip':
        return random_flip(random_crop(x, 4))  # the classic CIFAR-10 augmentation: shifts of up to 4 pixels, flips
    if policy == 'randaugment':
        return rand_augment(random_flip(random_crop(x, 4)))
    return x


# -----------------------------------------------------------------------------
# test-time corruptions (eval.py), batch-wise on the device; images are float in [0, 1] and stay in [0, 1]. Every
# random choice is drawn once for the whole test set from a fixed seed (noise_draws), so an image's corruption depends
# on its index alone: every run of a dataset sees the same corrupted test set, at any batch size. The severities of a
# kind share their draws (the same noise, scaled; 10% of the patches are among the 25%), so that they nest.

CORRUPTIONS = {  # kind -> severities, mildest first
    'gaussian': (0.05, 0.1, 0.2, 0.3, 0.5),  # σ of added N(0, σ²) noise
    'occlusion': (0.1, 0.25, 0.5),  # share of the patches blanked to the dataset's mean colour
    'distractors': (0.1, 0.25, 0.5),  # share of the patches replaced by the same patch of test images of other classes
    'blur': (0.5, 1.0, 1.5),  # σ in pixels of a Gaussian blur
    'contrast': (0.5, 0.3, 0.15),  # factor that scales each image about its mean
}
NOISE_SEED = 1234


def noise_draws(y, shape, patch_size, seed=NOISE_SEED):
    """The random choices of every corruption for a whole test set of labels y and images of shape (C, H, W):
    unit Gaussian noise per pixel, a rank per patch (the lowest-ranked share of the patches is hit), and for each
    patch the index of a test image of another class to take it from."""
    g = torch.Generator().manual_seed(seed)
    n, num_patches = len(y), (shape[1] // patch_size) * (shape[2] // patch_size)
    gauss = torch.randn((n, *shape), generator=g)
    rank = torch.rand(n, num_patches, generator=g).argsort(dim=1).argsort(dim=1)
    labels = y.cpu()
    source = torch.randint(0, n, (n, num_patches), generator=g)
    clash = labels[source] == labels[:, None]
    while clash.any():  # redraw the patches that would come from an image of the same class
        source[clash] = torch.randint(0, n, (int(clash.sum()),), generator=g)
        clash = labels[source] == labels[:, None]
    return {k: v.to(y.device) for k, v in dict(gauss=gauss, rank=rank, source=source).items()}


def patch_mask(rank, share, patch_size, image_size):
    """(B, P) ranks -> (B, 1, H, W) bool: the pixels of the round(share * P) lowest-ranked patches."""
    grid = image_size // patch_size
    hit = (rank < round(share * rank.size(1))).view(-1, 1, grid, grid)
    return hit.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


def gaussian_blur(x, sigma):
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    C = x.size(1)
    x = F.pad(x, (radius,) * 4, mode='reflect')
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)  # rows, then columns: separable
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def corrupt(x_all, idx, kind, severity, draws, patch_size, dataset):
    """Test images x_all[idx] (uint8; x_all the whole test set) corrupted by one kind at one severity: float in [0, 1]."""
    x = x_all[idx].float() / 255
    image_size = x.size(-1)
    if kind == 'gaussian':
        x = x + severity * draws['gauss'][idx]
    elif kind == 'occlusion':
        mean = torch.tensor(DATASETS[dataset]['mean'], device=x.device).view(1, -1, 1, 1)
        x = torch.where(patch_mask(draws['rank'][idx], severity, patch_size, image_size), mean, x)
    elif kind == 'distractors':
        B, C, H, W = x.shape
        grid = H // patch_size
        # every test image as (N, P, C, p, p) patches; take patch k of image source[i, k] for patch k of image i
        patches = x_all.view(-1, C, grid, patch_size, grid, patch_size).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
        source = patches[draws['source'][idx], torch.arange(grid * grid, device=x.device)].float() / 255
        source = source.view(B, grid, grid, C, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        x = torch.where(patch_mask(draws['rank'][idx], severity, patch_size, image_size), source, x)
    elif kind == 'blur':
        x = gaussian_blur(x, severity)
    elif kind == 'contrast':
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + severity * (x - mean)
    else:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return x.clamp(0, 1)
