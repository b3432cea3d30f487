"""Speculative Jacobi decoding (`--draft jacobi`): the target verifies its own previous guesses, no draft model.

Each sample keeps a window of L guesses after its accepted prefix, each with the Gaussian q it was drawn from.
One `target_verify` over [last accepted token, guesses] gives the target's p at every window slot (slot j is
conditioned on the guesses before it). Guesses are accepted left to right with min(1, p(x)/q(x)); at the first
rejection the token is drawn from the residual max(0, p - q), the bonus token from p when all pass
(the model-draft rule). The verify's p at the slots after the emitted token become the new
guesses' proposals (conditioned on stale guesses: that is what q records); positions past the verified window,
and the whole first window, take the calibrated prior (per class and position, Manifest.jacobi_prior) where the
manifest has one (else the last slot's p; the first round is then a plain target step).

Maximal coupling (`coupling=True`): a slot that already holds a guess x_old ~ q_old keeps it with probability
min(1, p_new(x_old)/q_old(x_old)), else draws from max(0, p_new - q_old); either way x ~ p_new, which becomes its
recorded q. `coupling=False` draws every new guess independently from p_new (the SJD baseline).

Every residual draw here (the emitted token at a rejection, a coupled guess not kept) is the reflected residual
(sampling.reflected_residual): exactly the residual's law, but the mirror image of the rejected x_old across the
midplane of p and q instead of an independent draw, so it lies near x_old, and the slots after it, whose p this
verify computed conditioned on x_old, keep nearly their context: their next guesses pass more often (shipped
model, ONNX Runtime, batch 1: 3.33 -> 3.58 tokens per target call at L = 8, 4.33 -> 4.69 at L = 16).

Why it is exact: a guess is examined only once every slot before it is accepted, and neither its value nor its
coupling coin entered anything that decided those slots (the verify is causal, acceptance goes left to right,
and the proposal p_new of a slot depends on inputs before it only). So given the accepted prefix and its
recorded q, each guess is distributed as q, and the accept/residual rule returns exactly the target's p.
"""
from __future__ import annotations

import numpy as np

from .generation import next_round, round_limit
from .kv_cache import windows
from .sampling import TokenDistribution, log_density_ratio, reflected_residual, sample_gaussian, sample_residual



CPU_RESIDUAL_PROPOSALS = 4
PROPOSAL_RANGE = (2, 16)        # every value residual_proposals gives (a TensorRT profile's range for them)


def residual_proposals(rows: int, accelerator: bool = False) -> int:
    """In-graph residual proposals per slot (each kept with probability TV(p, q); a slot none of them serves is
    finished on the host, exactly). On an accelerator the proposals cost next to nothing and a host finish costs a
    synchronisation: 16 for a few rows, fewer for many. On a CPU their tensor work is paid in every call and a host
    finish is cheap: 4 (measured, ONNX Runtime, batch 1, L = 8: 16 -> 4 proposals took 0.22 ms off a 1.47 ms
    target_jacobi call for one more host finish every ~6 rounds; whole images 4-9 % faster at batch 1 and 8)."""
    if not accelerator:
        return CPU_RESIDUAL_PROPOSALS
    return max(PROPOSAL_RANGE[0], min(PROPOSAL_RANGE[1], 128 // max(rows, 1)))


def couple_guesses(rng: np.random.Generator, x_old: np.ndarray, old_mean, old_sigma, new_mean, new_sigma):
    """Maximal coupling of x_old [R, D] ~ N(old) into a sample of N(new): keep x_old with probability
    min(1, new(x_old)/old(x_old)), else draw from max(0, new - old) near x_old (reflected_residual). Then
    x ~ N(new) exactly, equal to x_old with probability 1 - TV(old, new). Returns (x [R, D], kept [R]).
    (`resolve_slots` applies this rule to every slot after the emitted token, with the acceptance test's own ratios
    and coins.)"""
    log_ratio = log_density_ratio(x_old, new_mean, new_sigma, old_mean, old_sigma)      # log p_new - log q_old
    kept = np.log(rng.random(len(x_old))) < log_ratio
    x = x_old.copy()
    redo = np.flatnonzero(~kept)
    if redo.size:
        x[redo] = reflected_residual(rng, x_old[redo], new_mean[redo], new_sigma[redo], old_mean[redo],
                                     old_sigma[redo])
    return x, kept


def resolve_slots(rng: np.random.Generator, guesses: np.ndarray, k: np.ndarray, p: TokenDistribution,
                  q: TokenDistribution, window: int, coupling: bool):
    """One round's sampling for R rows: guesses [R, G, D] (the first k[r] real) with their q [R, G]; p [R, G + 1]
    from the verify. Returns (accepted [R], out [R, window + 1, D], next_mean [R, window, D], next_sigma
    [R, window]): out[:, 0] is the emitted token (residual at the first rejection, else the bonus), out[:, 1:]
    the next window's guesses, drawn from / coupled into the verify's p at their slots (the last slot's p past
    it), which are their recorded q.

    One log-ratio per slot serves both rules: slot j's acceptance test min(1, p_j/q_j) and, for j after the
    emitted token, the coupling of its guess (drawn from q_j) into p_j, with the same uniform: the acceptance
    outcome depends only on the coins up to the first rejection, so the later coins are still fresh."""
    R, G = guesses.shape[:2]
    log_ratio = log_density_ratio(guesses, p.mean[:, :G], p.sigma[:, :G], q.mean, q.sigma)      # log p - log q
    has_guess = np.arange(G)[None, :] < k[:, None]
    rejected = has_guess & (np.log(rng.random((R, G))) >= log_ratio)
    accepted = np.where(rejected.any(axis=1), rejected.argmax(axis=1), k) if G else np.zeros(R, np.int64)
    rows = np.arange(R)[:, None]
    slots = accepted[:, None] + np.arange(window + 1)[None, :]                  # [R, window + 1]: a .. a + window
    source = np.minimum(slots, k[:, None])
    mean, sigma = p.mean[rows, source], p.sigma[rows, source]
    out = sample_gaussian(rng, mean, sigma)
    held = slots < k[:, None]                     # slots with a guess: the rejected one at a, later ones
    if G and held.any():
        at = np.minimum(slots, G - 1)
        keep = held & ~rejected[rows, at]         # (the slot at a, when held, is rejected by definition)
        if not coupling:
            keep[:] = False
            held[:, 1:] = False                   # independent guesses: only the rejected slot needs a residual
        out[keep] = guesses[rows, at][keep]
        redo = held & ~keep
        if redo.any():
            r, c = np.nonzero(redo)
            j = slots[r, c]
            out[r, c] = reflected_residual(rng, guesses[r, j], p.mean[r, j], p.sigma[r, j], q.mean[r, j],
                                           q.sigma[r, j])
    return accepted, out, mean[:, 1:], sigma[:, 1:]


def jacobi_rounds(target, seq, token_entropy: np.ndarray, n: np.ndarray, total: int, n_cond: int,
                  window: int, coupling: bool, rng: np.random.Generator, stats, engine=None,
                  accelerator: bool = False, prior=None) -> None:
    """Run Jacobi rounds until every sample has `total` tokens; fills seq / token_entropy in place like the
    model-draft loop (seq needs window + 1 spare positions per row, token_entropy window + 1 spare columns).

    With `engine` (the target_jacobi engine) a round with guesses is one engine call that also samples: the
    rule above in-graph, fed the round's uniforms and normals from `rng`; only a residual slot none of its
    in-graph proposals served is finished here (the same rejection sampler, continued). Without it
    (or in a round without guesses) the round is a target_verify call and `resolve_slots` (on the host).
    seq and the guesses live where target.arrays keeps them (runtime/arrays.py); a round reads back its accepted
    counts, residual misses and entropies in one transfer.

    prior: (mean [B, N, D], sigma [B, N]) on the host, each row's first-window proposal (Manifest.jacobi_prior at
    the row's class and temperature): the first round then verifies guesses for tokens 0 .. L - 1 drawn from it
    (fed [condition slot, guesses]) instead of a plain target step whose one token's p proposes every guess of
    the next window (a guess drawn from token 0's wide p never passed token 1's test: that round made one token
    every time, shipped model). Needs n_cond == 1 (the feed is then [last position before the guesses, guesses])."""
    from .ar_engine import round_results

    arrays = target.arrays
    B, D, L = seq.shape[0], seq.shape[-1], window
    guess_mean = arrays.zeros((B, total + L + 1, D))      # q of the guess at token index j, column j
    guess_sigma = arrays.ones((B, total + L + 1))
    have = np.zeros(B, np.int64)                        # guesses in each window (none before the first round)
    seq_windows, out_windows = arrays.windows(seq, L), arrays.windows(seq, L + 1)
    entropy_windows = windows(token_entropy, L + 1)
    mean_windows, sigma_windows = arrays.windows(guess_mean, L), arrays.windows(guess_sigma, L)
    coupling_flag = np.array([1.0 if coupling else 0.0], np.float32)
    if prior is not None and n_cond == 1 and not n.any():     # the first window: every guess from the prior
        propose_from_prior(arrays, rng, prior, seq, guess_mean, guess_sigma, np.arange(B), np.zeros(B, np.int64),
                           np.full(B, -1), total, n_cond, L)
        have[:] = L
    rounds, limit = 0, round_limit(n, total)
    while (act := np.flatnonzero(n < total)).size:
        rounds = next_round(rounds, limit, "Jacobi")
        na = n[act]
        base = n_cond + na                                # position of token na, the first one this round makes
        # guesses verified (0: a plain target step); the widest feed must fit every row's cache (rows near the end
        # beside rows with room: fewer guesses tested, never a feed shifted back over cached positions)
        k = np.minimum(have[act], np.minimum(total - 1 - na, target.cache.capacity - int(base.max())))
        kmax = int(k.max())
        q_mean, q_sigma = mean_windows[act, na][:, :kmax], sigma_windows[act, na][:, :kmax]
        if engine is not None and kmax:
            R, C = len(act), residual_proposals(len(act), accelerator)
            # the feed's own arrays, refilled every round (arrays.kept: the engine's bindings stay)
            q_mean, q_sigma = arrays.kept_copy("q_mean", q_mean), arrays.kept_copy("q_sigma", q_sigma)
            sampling = (q_mean, q_sigma, arrays.kept_copy("k", k), arrays.uniform(rng, (R, kmax), "coins"),
                        arrays.normal(rng, (R, L + 1, D), kept="noise"),
                        arrays.normal(rng, (R, L + 1, C, D), kept="residual_noise"),
                        arrays.uniform(rng, (R, L + 1, C), "residual_coins"))
            res = target.jacobi(engine, seq, act, base + k, sampling, coupling_flag)
            accepted, miss, entropy = round_results(arrays, (target,), res.accepted, res.residual_miss,
                                                    res.slot_entropy)
            accepted, out = accepted.astype(np.int64), res.tokens_out
            next_mean, next_sigma = res.slot_mean[:, 1:], res.slot_sigma[:, 1:]
            if miss.any():
                r, c = np.nonzero(miss)
                out = finish_residuals(rng, arrays, out, res, r, c, accepted, q_mean, q_sigma)
        else:
            p, _ = target.predict(seq, act, base - 1, base + k, kmax + 1)
            guesses = seq_windows[act, base][:, :kmax]    # copies (fancy index): the window is rewritten below
            if arrays.on_device:                          # a round without in-graph sampling runs on the host
                *p_host, guesses, q_mean, q_sigma = round_results(arrays, (target,), p.mean, p.sigma, p.entropy,
                                                                  guesses, q_mean, q_sigma)
                p = TokenDistribution(*p_host)
            accepted, out, next_mean, next_sigma = resolve_slots(rng, guesses, k, p,
                                                                 TokenDistribution(q_mean, q_sigma, None), L,
                                                                 coupling)
            entropy = p.entropy
            if arrays.on_device:
                out, next_mean, next_sigma = (arrays.to_device(np.asarray(a, np.float32))
                                              for a in (out, next_mean, next_sigma))
        out_windows[act, base + accepted] = out          # the emitted token, then the next window's guesses
        entropy_windows[act, na, :kmax + 1] = entropy    # slots past `accepted` are rewritten later
        first = na + accepted + 1
        mean_windows[act, first], sigma_windows[act, first] = next_mean, next_sigma
        if prior is not None:       # the new window's positions past the verified span: from the prior
            propose_from_prior(arrays, rng, prior, seq, guess_mean, guess_sigma, act, first, na + k, total, n_cond, L)
        n[act] = first
        have[act] = L
        target.rollback(act, base + accepted)            # = n_cond + n - 1: the new token is not fed yet
        stats.record_round(k, accepted)


def propose_from_prior(arrays, rng: np.random.Generator, prior, seq, guess_mean, guess_sigma, act: np.ndarray,
                       first: np.ndarray, verified: np.ndarray, total: int, n_cond: int, window: int) -> None:
    """Guesses for the positions of each row's new window (tokens first[r] .. first[r] + window - 1) past the
    tokens a verify computed p for (> verified[r]) and before `total`: drawn from the prior (mean [B, N, D],
    sigma [B, N] on the host), written into seq with their q. The last verified p (the proposal there otherwise)
    is another position's distribution: a guess drawn from it seldom passes, and the slots after it are then
    verified in an implausible context (shipped model, torch loop, 200 images: tokens per target call
    3.82 -> 4.29 at L = 8, 5.25 -> 5.73 at L = 16, with the first window from the prior in both)."""
    start, stop = np.maximum(verified + 1, first), np.minimum(first + window, total)      # tokens start .. stop - 1
    if len(act) == 1:                          # one row (batch 1): slices, the same draws as the general case
        start, stop = int(start[0]), int(stop[0])
        if start >= stop:
            return
        rows, token, at = int(act[0]), slice(start, stop), slice(n_cond + start, n_cond + stop)
    else:
        token = first[:, None] + np.arange(window)[None, :]                   # [R, window]
        r, c = np.nonzero((token >= start[:, None]) & (token < stop[:, None]))
        if not r.size:
            return
        rows, token = act[r], token[r, c]
        at = n_cond + token
    mean, sigma = prior[0][rows, token], prior[1][rows, token]
    noise = arrays.normal(rng, mean.shape)
    mean, sigma = arrays.to_device(mean), arrays.to_device(sigma)
    seq[rows, at] = mean + sigma[:, None] * noise
    guess_mean[rows, token], guess_sigma[rows, token] = mean, sigma


def accept_drafts_in_engine(target, engine, seq, act: np.ndarray, base: np.ndarray, k, width: int, q_mean, q_sigma,
                            rng: np.random.Generator, others=(), accelerator: bool = False):
    """The model-draft round's verify and acceptance in one target_jacobi call: the drafts at seq[act, base ..
    base + k - 1] are its guesses (every row fed `width` slots, k[r] <= width of them real), their draft
    Gaussians q their recorded q, coupling off (only the rejected slot draws a residual). Same rule as
    sampling.accept_drafts: left to right with min(1, p/q), the residual max(0, p - q) at the first rejection
    (finished here when none of the in-graph proposals served it), the bonus from p when all pass. Needs every
    row's target cache valid up to base - 1 and room for width + 1 fed positions past it (the feed is never
    shifted back). Returns (accepted [R], k [R] on the host, next token [R, D], target entropy at the verified
    slots [R, width + 1] on the host): with the finiteness checks of `others` (the draft engine), the round's one
    readback."""
    from .ar_engine import round_results

    arrays = target.arrays
    R, D = len(act), seq.shape[-1]
    C = residual_proposals(R, accelerator)
    q_mean, q_sigma = q_mean[:, :width], q_sigma[:, :width]
    sampling = (q_mean, q_sigma, k, arrays.uniform(rng, (R, width)), arrays.normal(rng, (R, 2, D)),
                arrays.normal(rng, (R, 2, C, D)), arrays.uniform(rng, (R, 2, C)))
    res = target.jacobi(engine, seq, act, base + width, sampling, NO_COUPLING)
    accepted, k, miss, entropy = round_results(arrays, (target, *others), res.accepted, k, res.residual_miss[:, 0],
                                               res.slot_entropy)
    accepted, out = accepted.astype(np.int64), res.tokens_out
    if miss.any():
        r = np.flatnonzero(miss)
        out = finish_residuals(rng, arrays, out, res, r, np.zeros_like(r), accepted, q_mean, q_sigma)
    return accepted, k.astype(np.int64), out[:, 0], entropy


NO_COUPLING = np.zeros(1, np.float32)


def finish_residuals(rng: np.random.Generator, arrays, out, res, r: np.ndarray, c: np.ndarray, accepted: np.ndarray,
                     q_mean, q_sigma):
    """Residual slots (rows r, slots c) whose in-graph proposals were all rejected: continue the rejection
    sampler on the host (the reflected residual's second stage: the first kept proposal of an i.i.d. sequence from
    p, wherever counting starts; the in-graph mirror image was its first stage). Returns out with those samples
    written (on a device: a copy, the engine's output being read-only there)."""
    j = accepted[r] + c                                   # the slot's guess index (it has a guess: j < k)
    p_mean, p_sigma, g_mean, g_sigma = arrays.readback(res.slot_mean[r, c], res.slot_sigma[r, c], q_mean[r, j],
                                                       q_sigma[r, j])
    wide = lambda a: np.asarray(a, np.float64)  # noqa: E731
    sample = sample_residual(rng, wide(p_mean), wide(p_sigma), wide(g_mean), wide(g_sigma), reflected=True)
    if arrays.on_device:
        out = out.clone()
    out[r, c] = arrays.to_device(sample.astype(np.float32))
    return out
