# cifar10_small: a compact ViT that trains on a 2-core CPU, differential attention: its 8 classic heads become 4 differential heads
# with qk_norm: an RMSNorm on every query and key head before the dot product (Dehghani et al. 2023)
dataset = 'cifar10'
attention = 'diff'
qk_norm = True

# 64 tokens of 4x4 patches, 4 blocks of width 96, MLP 192: 0.31M parameters; one epoch takes about 5 minutes on
# one thread of a 2-core AVX2 CPU (results/NOTES.md)
patch_size = 4
n_embd = 96
mlp_dim = 192
n_layer = 4
n_head = 8
dropout = 0.0

# the same recipe for the three variants, chosen on the validation split (results/NOTES.md)
epochs = 15
batch_size = 128
learning_rate = 2e-3
min_lr = 1e-5
warmup_epochs = 1.0
weight_decay = 0.05
label_smoothing = 0.1
grad_clip = 1.0
augment = 'cropflip'
# float32 on every CPU, so that runs from machines with and without bfloat16 pool into one study
dtype = 'float32'
