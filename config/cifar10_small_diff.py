# cifar10_small: a compact ViT that trains on a 2-core CPU, differential attention: its 8 classic heads become 4 differential heads
dataset = 'cifar10'
attention = 'diff'

# 64 tokens of 4x4 patches, 6 blocks of width 128, MLP 256: 0.81M parameters, about 100 s per epoch on a
# 2-core AVX512-BF16 CPU in bfloat16 (see the README's CIFAR-10 section and results/NOTES.md)
patch_size = 4
n_embd = 128
mlp_dim = 256
n_layer = 6
n_head = 8
dropout = 0.0

# the same recipe for the three variants, chosen on the validation split (results/NOTES.md)
epochs = 20
batch_size = 128
learning_rate = 2e-3
min_lr = 1e-5
warmup_epochs = 1.0
weight_decay = 0.05
label_smoothing = 0.1
grad_clip = 1.0
augment = 'cropflip'
