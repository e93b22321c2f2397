"""The project's own kernels (see kernels/README.md): chosen by capability, checked against torch."""
