"""fl_app: federated learning with Flower, PyTorch and Hydra."""
