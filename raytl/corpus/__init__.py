"""Image corpora: listings of folders, manifests, archives and WebDataset shards."""
