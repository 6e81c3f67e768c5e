"""Downstream evaluation: benchmark readers, protocols, metrics and the results table."""
