# fashionmnist: lite ViT, classic attention with 4 heads of width 16 (the old project's 'balanced')
dataset = 'fashionmnist'
attention = 'classic'

# the old project's lite model, its sizes unchanged so that its table stays comparable (its dropout, 0.1, went
# with its recipe: results/NOTES.md); there, configs/FashionMNIST/balanced_config.yml of
# https://github.com/eithannak29/NanoDiffVision
patch_size = 4
n_embd = 64
mlp_dim = 128
n_layer = 2
n_head = 4
dropout = 0.0

# recipe chosen on the validation split, the same for the three fashionmnist variants
epochs = 30
batch_size = 64
learning_rate = 3e-3
min_lr = 1e-5
warmup_epochs = 1.0
weight_decay = 0.1
label_smoothing = 0.1
grad_clip = 1.0
augment = 'none'
