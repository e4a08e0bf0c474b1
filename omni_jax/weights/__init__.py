"""Weight file formats: streaming safetensors reading and writing (see `omni_jax.hf_mapping` for the
HF <-> omni_jax name table and `omni_jax.checkpoint` for Orbax)."""
