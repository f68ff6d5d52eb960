"""Minimal stand-in for timm: torchscale imports only timm.models.layers.drop_path, and the
real timm pulls torchvision and a CUDA torch. Used only when timm is not installed."""
