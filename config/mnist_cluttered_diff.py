# mnist_cluttered (a digit among fragments of others on a 40 x 40 canvas, 100 patches): lite ViT, differential
# attention: its 2 classic heads become 1 differential head
dataset = 'mnist_cluttered'
attention = 'diff'

# MNIST's lite model, unchanged, so that the two datasets compare
patch_size = 4
n_embd = 64
mlp_dim = 128
n_layer = 2
n_head = 2
dropout = 0.0

# MNIST's recipe, the same for the three variants; whether it suits the clutter is checked on the validation split
# (results/NOTES.md, "Cluttered MNIST")
epochs = 10
batch_size = 64
learning_rate = 1e-3
min_lr = 1e-5
warmup_epochs = 1.0
weight_decay = 0.1
label_smoothing = 0.1
grad_clip = 1.0
augment = 'none'
