"""Names of data presets that both the config's schema and the builders read. Here, importing
nothing, so that replica_dist.vision (which needs torch) and replica_dist.config (which must not
import torch) share one spelling without importing each other."""

VISION_DATA = ("imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist")
"""The torchvision presets (replica_dist/vision.py)."""
