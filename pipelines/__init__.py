"""Prefect flows and the `posttrain` command line."""
