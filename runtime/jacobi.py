"""Speculative Jacobi decoding (`--draft jacobi`): the target verifies its own previous guesses, no draft model.

Each sample keeps a window of L guesses after its accepted prefix, each with the Gaussian q it was drawn from.
One `target_verify` over [last accepted token, guesses] gives the target's p at every window slot (slot j is
conditioned on the guesses before it). Guesses are accepted left to right with min(1, p(x)/q(x)); at the first
rejection the token is drawn from the residual max(0, p - q), the bonus token from p when all pass
(`accept_drafts`, the model-draft rule). The verify's p at the slots after the emitted token become the new
guesses' proposals (conditioned on stale guesses: that is what q records); positions past the verified window
take the last slot's p as their proposal.

Maximal coupling (`coupling=True`): a slot that already holds a guess x_old ~ q_old keeps it with probability
min(1, p_new(x_old)/q_old(x_old)), else draws from max(0, p_new - q_old); either way x ~ p_new, which becomes its
recorded q. `coupling=False` draws every new guess independently from p_new (the SJD baseline).

Why it is exact: a guess is examined only once every slot before it is accepted, and neither its value nor its
coupling coin entered anything that decided those slots (the verify is causal, acceptance goes left to right,
and the proposal p_new of a slot depends on inputs before it only). So given the accepted prefix and its
recorded q, each guess is distributed as q, and the accept/residual rule returns exactly the target's p.
"""
from __future__ import annotations

import numpy as np

from .sampling import TokenDistribution, accept_prefix, log_density_ratio, sample_gaussian, sample_residual


def coupling_keeps(rng: np.random.Generator, x_old: np.ndarray, old_mean, old_sigma, new_mean, new_sigma):
    """Maximal coupling, first half: keep x_old ~ N(old) as a sample of N(new) with probability
    min(1, new(x_old)/old(x_old)) [R] bool; the rows not kept draw from max(0, new - old) (`sample_residual`),
    and then x ~ N(new) exactly, equal to x_old with probability 1 - TV(old, new)."""
    log_ratio = log_density_ratio(x_old, new_mean, new_sigma, old_mean, old_sigma)      # log p_new - log q_old
    return np.log(rng.random(len(x_old))) < log_ratio


def couple_guesses(rng: np.random.Generator, x_old: np.ndarray, old_mean, old_sigma, new_mean, new_sigma):
    """Maximal coupling of x_old [R, D] ~ N(old) into a sample of N(new). Returns (x [R, D], kept [R])."""
    kept = coupling_keeps(rng, x_old, old_mean, old_sigma, new_mean, new_sigma)
    x = x_old.copy()
    redo = np.flatnonzero(~kept)
    if redo.size:
        x[redo] = sample_residual(rng, new_mean[redo], new_sigma[redo], old_mean[redo], old_sigma[redo])
    return x, kept


def jacobi_rounds(target, seq: np.ndarray, token_entropy: np.ndarray, n: np.ndarray, total: int, n_cond: int,
                  window: int, coupling: bool, rng: np.random.Generator, stats) -> None:
    """Run Jacobi rounds until every sample has `total` tokens; fills seq / token_entropy in place like the
    model-draft loop (seq needs window + 1 spare positions per row, token_entropy window + 1 spare columns)."""
    from .speculative import windows

    B, D, L = seq.shape[0], seq.shape[-1], window
    guess_mean = np.zeros((B, total + L + 1, D))        # q of the guess at token index j, column j
    guess_sigma = np.ones((B, total + L + 1))
    have = np.zeros(B, np.int64)                        # guesses in each window (none before the first round)
    seq_windows, entropy_windows = windows(seq, L), windows(token_entropy, L + 1)
    mean_windows, sigma_windows = windows(guess_mean, L), windows(guess_sigma, L)
    spans = np.arange(L)[None, :]
    while (act := np.flatnonzero(n < total)).size:
        R = len(act)
        na = n[act]
        base = n_cond + na                                # position of token na, the first one this round makes
        k = np.minimum(have[act], total - 1 - na)         # guesses verified (0: a plain target step)
        kmax = int(k.max())
        p, _ = target.predict(seq, act, base - 1, base + k, kmax + 1)
        guesses = seq_windows[act, base][:, :kmax]        # copies (fancy index): the window is rewritten below
        q = TokenDistribution(mean_windows[act, na][:, :kmax], sigma_windows[act, na][:, :kmax], None)
        accepted = accept_prefix(rng, guesses, k, p, q)
        rows = np.arange(R)
        next_token = sample_gaussian(rng, p.mean[rows, accepted], p.sigma[rows, accepted])  # the bonus where all pass
        n[act] = na + accepted + 1
        target.rollback(act, base + accepted)            # = n_cond + n - 1: the new token is not fed yet

        # the next window: slots accepted+1 .. accepted+L of this verify; proposals from its p (the last slot's
        # past the verified span)
        slots = accepted[:, None] + 1 + spans             # [R, L]
        source = np.minimum(slots, k[:, None])
        new_mean, new_sigma = p.mean[rows[:, None], source], p.sigma[rows[:, None], source]
        new = sample_gaussian(rng, new_mean, new_sigma)
        # residual samples, in one call: the rejected slot of each row that stopped early and, with coupling,
        # every old guess the coupling did not keep
        fix = np.flatnonzero(accepted < k)
        pm, ps = p.mean[fix, accepted[fix]], p.sigma[fix, accepted[fix]]
        qm, qs = q.mean[fix, accepted[fix]], q.sigma[fix, accepted[fix]]
        if coupling:
            r, c = np.nonzero(slots < k[:, None])         # slots holding a guess this verify was fed
            if r.size:
                old = slots[r, c]
                x_old = guesses[r, old]
                kept = coupling_keeps(rng, x_old, q.mean[r, old], q.sigma[r, old], new_mean[r, c], new_sigma[r, c])
                new[r[kept], c[kept]] = x_old[kept]
                r, c, old = r[~kept], c[~kept], old[~kept]
                pm, ps = np.concatenate([pm, new_mean[r, c]]), np.concatenate([ps, new_sigma[r, c]])
                qm, qs = np.concatenate([qm, q.mean[r, old]]), np.concatenate([qs, q.sigma[r, old]])
        if len(pm):
            residual = sample_residual(rng, pm, ps, qm, qs)
            next_token[fix] = residual[:fix.size]
            if coupling and r.size:
                new[r, c] = residual[fix.size:]
        seq[act, base + accepted] = next_token
        entropy_windows[act, na, :kmax + 1] = p.entropy  # slots past `accepted` are rewritten later
        first = na + accepted + 1
        seq_windows[act, n_cond + first] = new
        mean_windows[act, first], sigma_windows[act, first] = new_mean, new_sigma
        have[act] = L

        if stats.track_positions:
            stats.record_positions(k, accepted)
        bonus = int((accepted == k).sum())
        stats.verifies += R
        stats.drafts_proposed += int(k.sum())
        stats.drafts_accepted += int(accepted.sum())
        stats.residual_samples += R - bonus
        stats.bonus_tokens += bonus
