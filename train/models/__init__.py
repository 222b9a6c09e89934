"""Encoder and full-model architectures; importing this package registers every encoder."""

from train.models import ae, la, mpnn, siamese  # noqa: F401
