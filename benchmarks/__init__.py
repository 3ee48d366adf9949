"""Offline benchmarks: scenarios, runner (predicted beside measured), reports, the GPU check."""
