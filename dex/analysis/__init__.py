"""Analyses of trained models: routing specialisation (more in later issues)."""
