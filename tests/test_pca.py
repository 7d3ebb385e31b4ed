import torch

from slicegpt_export.converter.pca import CovarianceAccumulator, principal_components


def test_principal_components_recover_known_axes_up_to_sign():
    gen = torch.Generator().manual_seed(0)
    axes, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))  # known orthogonal basis
    scales = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    x = (torch.randn(4, 5000, 6, generator=gen, dtype=torch.float64) * scales) @ axes.T  # variance scales**2 along axes
    acc = CovarianceAccumulator(6, torch.device("cpu"))
    acc.add(x)
    eigenvalues, Q = principal_components(acc.cov / acc.count, damping=0.0)
    assert torch.allclose(eigenvalues.sqrt(), scales, rtol=0.05)
    assert torch.allclose((Q.T @ axes).abs(), torch.eye(6, dtype=torch.float64), atol=0.05)
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_damping_keeps_eigenvectors_and_reports_undamped_eigenvalues():
    cov = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # singular
    eigenvalues, Q = principal_components(cov)
    plain_values, plain_vectors = torch.linalg.eigh(cov)
    assert torch.allclose(eigenvalues, plain_values.flip(0), atol=1e-12)
    assert torch.allclose((Q.T @ plain_vectors.flip(1)).abs(), torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_padding_rows_are_left_out_of_the_covariance():
    x = torch.tensor([[[1.0, 0.0], [100.0, 100.0]]])  # (1, 2, 2); the second token is padding
    acc = CovarianceAccumulator(2, torch.device("cpu"))
    acc.add(x, torch.tensor([[1, 0]]))
    assert acc.count == 1
    assert torch.equal(acc.cov, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
