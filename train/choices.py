"""The choices the trainers' command lines offer, defined without torch so that ``--help`` and argument errors
answer before it loads (``train.models`` imports these names from here)."""

BACKBONES = ("vgg16bn", "conv")  # train.models.layers builds each
LA_BACKBONES = (*BACKBONES, "resnet18", "kmeans")  # LA also trains a torchvision ResNet-18 (random init) and on
# a k-means patch layer (Coates & Ng); the AE does not
LOSSES = ("binary", "contrastive", "triplet")  # siamese losses (train.siamese picks one)
MININGS = ("hard", "semihard")  # triplet mining (train.models.siamese)
DEFAULT_MARGIN = {"contrastive": 1.0, "triplet": 0.2}  # on distances between unit vectors (0..2)
