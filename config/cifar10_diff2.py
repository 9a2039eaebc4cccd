# cifar10: compact ViT, Differential Transformer V2: 8 heads, each with two queries on one key and value
dataset = 'cifar10'
attention = 'diff2'

# a compact ViT: 64 tokens of 4x4 patches, 6 blocks of width 256 (3.6M parameters: classic's 3.2M, V2's second
# queries and λ projection; half the old default's 7 x 384), so that a full run fits in minutes on one GPU
patch_size = 4
n_embd = 256
mlp_dim = 512
n_layer = 6
n_head = 8
dropout = 0.0

# the same recipe for the three cifar10 variants; a starting point modelled on published compact-ViT
# recipes (ViT-Lite-6/4: 200-300 epochs, RandAugment-style policy, label smoothing), not yet tuned on a GPU
epochs = 200
batch_size = 512
learning_rate = 1e-3
min_lr = 1e-5
warmup_epochs = 10.0
weight_decay = 0.05
label_smoothing = 0.1
grad_clip = 1.0
augment = 'randaugment'
# float32, TF32 matmuls on CUDA: in bfloat16 diff fell 15 points below its float32 self on an H200 (results/NOTES.md)
dtype = 'float32'
