"""Downstream evaluation: encoders to adapt, fine-tuning with the paper's protocol, the benchmark suite."""
