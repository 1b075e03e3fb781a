"""The NumPy twin of every Rust kernel (`kernels.py`) and the reference Llama model (`llama.py`)."""
