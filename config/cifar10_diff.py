# 
dataset = 'cifar10'
attention = 'diff'

# a compact ViT: 64 tokens of 4x4 patches, 6 blocks of width 256 (about 3.2M parameters, half the
# old default's 7 x 384), so that a full run fits in minutes on one GPU; see the README
patch_size = 4
n_embd = 256
mlp_dim = 512
n_layer = 6
n_head = 8
dropout = 0.0

# the same recipe for the three cifar10 variants
epochs = 100
batch_size = 512
learning_rate = 2e-3
min_lr = 1e-5
warmup_epochs = 5.0
weight_decay = 0.05
label_smoothing = 0.1
grad_clip = 1.0
augment = 'randaugment'
