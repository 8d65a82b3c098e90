"""Images to tensors: decoding and preprocessing, GPU JPEG, the torchvision backbones."""
