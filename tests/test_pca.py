import torch

from slicegpt_export.converter.pca import exact_gram_sum, fixed_point_gram, grid_scale, masked_rows, principal_components


def test_principal_components_recover_known_axes_up_to_sign():
    gen = torch.Generator().manual_seed(0)
    axes, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))  # known orthogonal basis
    scales = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    x = (torch.randn(4, 5000, 6, generator=gen, dtype=torch.float64) * scales) @ axes.T  # variance scales**2 along axes
    cov = exact_gram_sum(lambda: (masked_rows(xi[None], None) for xi in x))
    eigenvalues, Q = principal_components(cov / 20000, damping=0.0)
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
    cov = exact_gram_sum(lambda: [masked_rows(x, torch.tensor([[1, 0]]))])
    assert torch.equal(cov, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_gram_sum_is_the_same_bits_however_the_blocks_are_split():
    """Summed as float64 the grouping shows in the last bits; on the fixed-point grid it cannot."""
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randn(50, 8, generator=gen, dtype=torch.float64) * 10.0 ** int(torch.randint(-3, 4, (1,), generator=gen)) for _ in range(12)]
    peak = max(b.pow(2).sum(0).max().item() for b in blocks)  # what the processes' max-reduction agrees on
    scale = grid_scale(peak, len(blocks))
    whole = fixed_point_gram(blocks, scale, 8, None)
    for split in (1, 5, 6, 11):  # two processes' partial sums, added by the sum-reduction
        assert torch.equal(fixed_point_gram(blocks[:split], scale, 8, None) + fixed_point_gram(blocks[split:], scale, 8, None), whole)
    plain = sum(b.T @ b for b in blocks)
    assert torch.allclose(exact_gram_sum(lambda: blocks), plain, rtol=0, atol=1e-15 * plain.abs().max().item())
    assert torch.equal(exact_gram_sum(lambda: blocks), whole.double() / scale)


def test_principal_components_are_the_same_bits_with_any_thread_count():
    """LAPACK's threaded eigh differs in the last bits with 1 vs 2 threads (a 576-wide covariance shows it);
    Q_l must not, or a data-parallel run (one thread per process) would not reproduce a one-process run."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(700, 576, generator=gen, dtype=torch.float64)
    cov = a.T @ a  # (576, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = principal_components(cov)
        assert torch.get_num_threads() == 2  # restored after the decomposition
        torch.set_num_threads(1)
        one = principal_components(cov)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[1])
