"""The version of hf_snp (recorded in every report)."""

__version__ = "0.1.0"
