"""Models, Ray-free: MODEL_DIR's contract, the probe, the network, the training core, metrics."""
