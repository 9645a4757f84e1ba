"""Analytic denoisers whose sampled distributions are known in closed form, for sampler tests."""

import torch

F64 = torch.float64


class GaussianMixture:
    """Isotropic Gaussian mixture over the flattened chunk, with its exact VE posterior mean.

    For x = a + sigma n and a ~ sum_k w_k N(mu_k, s_k^2 I): x ~ sum_k w_k N(mu_k, (s_k^2 + sigma^2) I),
    so E[a | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)) with r_k the posterior
    component responsibilities.
    """

    def __init__(self, means, stds, weights):
        self.mu = torch.tensor(means, dtype=F64)
        self.std = torch.tensor(stds, dtype=F64)
        self.w = torch.tensor(weights, dtype=F64)

    def __call__(self, x, sigma, cond):
        xf = x.reshape(x.shape[0], -1)
        mu, std, w = self.mu.to(x), self.std.to(x), self.w.to(x)
        var = std**2 + sigma.reshape(-1, 1) ** 2  # (batch, K)
        diff = xf[:, None, :] - mu[None]
        log_r = w.log() - 0.5 * xf.shape[1] * var.log() - 0.5 * (diff**2).sum(-1) / var
        mean_k = mu[None] + (std**2 / var)[..., None] * diff
        return (log_r.softmax(-1)[..., None] * mean_k).sum(1).reshape(x.shape)

    def nearest(self, a):
        af = a.reshape(a.shape[0], -1)
        return ((af[:, None, :] - self.mu[None]) ** 2).sum(-1).argmin(1)

    def shares(self, a):
        return torch.bincount(self.nearest(a), minlength=len(self.w)).to(F64) / a.shape[0]

    def component_stats(self, a):
        """Weight, mean and per-dimension std of the samples nearest to each component mean."""
        af, nearest = a.reshape(a.shape[0], -1), self.nearest(a)
        return [
            ((nearest == k).to(F64).mean(), af[nearest == k].mean(0), af[nearest == k].std(0))
            for k in range(len(self.w))
        ]
