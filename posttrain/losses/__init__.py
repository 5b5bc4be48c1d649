"""Pure loss functions on tensors, one module per algorithm; each returns `(loss, metrics)`."""
