"""The converter: family adapters, fusion, PCA, slicing and calibration."""
