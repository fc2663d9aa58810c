"""Deep Potential inference engine (NumPy / CuPy)."""
