"""Cost model, tile layout, Triton source rendering and the kernel cache."""
