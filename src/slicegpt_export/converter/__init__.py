"""The converter: loading, family adapters, fusion, PCA, slicing and calibration."""
