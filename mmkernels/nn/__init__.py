"""Drop-in ``nn.Module``s backed by mmkernels ops."""
