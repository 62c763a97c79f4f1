"""Tests of heatssl; the folders mirror the package."""
