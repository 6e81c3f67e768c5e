"""Figures and tables for ``snakemake --report``: what each stage did, rendered with matplotlib."""
