# cifar10_small, classic attention with the parameters of diff2 (351,482 against 351,658): a wider MLP (244, not
# 192), so that V2's 13% more parameters cannot explain a difference between them
dataset = 'cifar10'
attention = 'classic'

# 64 tokens of 4x4 patches, 4 blocks of width 96, MLP 244: 0.35M parameters; one epoch takes about 5 minutes on
# one thread of a 2-core AVX2 CPU (results/NOTES.md)
patch_size = 4
n_embd = 96
mlp_dim = 244
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
