"""The proposal kinds of the speculative loop (DESIGN.md "The runtime loop"), each one object with one round
interface over the run's shared state (`TokenLoop`):

    propose(rows)              drafts for the rows' next tokens and the densities q they were drawn from
    verify(rows, drafts)       the target's call(s) over [last accepted token, drafts] and the acceptance test:
                               how many drafts each row keeps, its next token (residual or bonus), the entropies
    accept(rows, ...)          the kept drafts and the next token written into the token buffer, lengths advanced
    roll_back(rows, ...)       every engine's cache reset to the accepted prefix (rejection is a length reset)

Kinds (the `PROPOSALS` registry): `target` / `draft` (none: one token per call of a single model), `model` (the draft model,
by draft_step calls or one draft_rollout call, accepted on the host or in the target_jacobi engine) and `jacobi`
(the target's own guesses from its previous verify, runtime/jacobi.py). The numerics live in runtime/sampling.py
and runtime/jacobi.py; this file holds the loop structure only.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .ar_engine import AREngine, round_results
from .early_stop import EarlyStop
from . import jacobi     # its sampling functions, looked up there at each call (tests replace them there)
from .kv_cache import windows
from .sampling import TokenDistribution, accept_drafts, sample_gaussian, scale_of


class TokenLoop:
    """What every proposal kind works on: the token buffer (position p holds the input of p, float32, where
    `arrays` keeps the loop), the target entropy of each token, the accepted count per sample, the engines and
    the early stop."""

    def __init__(self, shape, gen, rng, stats, arrays, total: int, target: AREngine, draft: AREngine | None,
                 stopper: EarlyStop, caps, window: int):
        B, G = target.batch, window           # the widest proposal of the run: G + 1 spare positions
        self.shape, self.gen, self.rng, self.stats, self.arrays, self.caps = shape, gen, rng, stats, arrays, caps
        self.B, self.nc, self.G, self.total, self.D = B, shape.n_cond, G, total, shape.token_dim
        self.target, self.draft, self.stopper = target, draft, stopper
        # position p holds the input of p: what the engines are fed and exactly the values the acceptance scores
        self.seq = arrays.zeros((B, shape.n_cond + shape.num_tokens + G + 1, shape.token_dim))
        # entropy of token j at column j; columns past a sample's accepted tokens may hold a verify's junk slots,
        # overwritten when those tokens are emitted (G + 1 spare columns so a verify never writes out of bounds)
        self.token_entropy = np.zeros((B, shape.num_tokens + G + 1))
        self.n = np.zeros(B, np.int64)                                     # accepted tokens per sample
        self.entropy_windows = windows(self.token_entropy, G + 1)  # [B, N + 1, G + 1]

    def active(self) -> np.ndarray:
        return np.flatnonzero(self.n < self.total)

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        nc, total = self.nc, self.total
        return np.array(self.arrays.readback(self.seq[:, nc: nc + total])[0]), self.token_entropy[:, :total]

    def release(self) -> None:
        for engine in (self.target, self.draft):
            if engine is not None:
                engine.cache.release()


class Drafts(NamedTuple):
    k: np.ndarray                   # [R] drafts proposed per row (on the device loop: still on the device)
    tokens: object                  # [R, G, D] the drafts (seq's window at the round's first position)
    q_mean: object                  # [R, G, D] the densities they were drawn from
    q_sigma: object                 # [R, G]
    q_offset: np.ndarray | None     # [R, G] log-density offsets (diffusion heads), or None
    max_drafts: np.ndarray          # [R] the most each row could propose


class Verdict(NamedTuple):
    k: np.ndarray                   # [R] drafts tested per row (on the host)
    kmax: int                       # slots verified past the first: entropy holds kmax + 1 columns
    accepted: np.ndarray            # [R] drafts kept
    next_token: object              # [R, D] the residual sample at the first rejection, else the bonus token
                                    # (Jacobi: that token and the next window's guesses [R, L + 1, D], with the
                                    # means [R, L, D] and sigmas [R, L] they were drawn from)
    entropy: np.ndarray             # [R, kmax + 1] the target's entropy at the verified slots


class Proposal:
    """One proposal kind. `round` runs Algorithm 1's lines for the rows `act`; a kind with state beyond the
    shared buffers (Jacobi's guesses, a lagging draft cache) makes it valid again in `enter` when the loop switches
    to it mid-run (runtime/adaptive.py)."""

    label = "?"

    def __init__(self, loop: TokenLoop):
        self.loop = loop

    def enter(self, act: np.ndarray) -> None:
        """Make this kind's state valid for rows `act` after rounds of another kind (nothing here)."""

    def round(self, act: np.ndarray) -> np.ndarray:
        """One round for rows `act`; returns the tokens each row gained."""
        loop = self.loop
        na = loop.n[act]
        base = loop.nc + na                    # position of token na[r], the first one this round makes
        drafts = self.propose(act, na, base)
        verdict = self.verify(act, base, drafts)
        self.accept(act, na, base, drafts, verdict)
        self.roll_back(act, base, verdict)
        return verdict.accepted + 1

    def propose(self, act, na, base) -> Drafts | None:
        return None

    def verify(self, act, base, drafts) -> Verdict:
        raise NotImplementedError

    def accept(self, act, na, base, drafts, verdict: Verdict) -> None:
        """The kept drafts are in place already (drafted into seq); the next token after them, the entropies, the
        early stop's context and the lengths."""
        loop = self.loop
        accepted = verdict.accepted
        loop.seq[act, base + accepted] = verdict.next_token
        loop.entropy_windows[act, na, :verdict.kmax + 1] = verdict.entropy   # slots past `accepted`: rewritten later
        loop.stopper.observe_target(act, verdict.entropy, accepted + 1)
        loop.n[act] = na + accepted + 1

    def roll_back(self, act, base, verdict: Verdict) -> None:
        loop = self.loop
        for engine in (loop.target, loop.draft):
            engine.rollback(act, base + verdict.accepted)      # = nc + n - 1: the new token is not fed yet
        loop.stats.record_round(verdict.k, verdict.accepted)


class SingleModel(Proposal):
    """No proposal: one token per call of one model (`target`: target-only, the baseline and the eta prefill;
    `draft`: the draft alone, a test reference)."""

    def __init__(self, loop: TokenLoop, stage: str = "target"):
        super().__init__(loop)
        self.label = stage
        self.engine = loop.target if stage == "target" else loop.draft

    def verify(self, act, base, drafts) -> Verdict:
        loop = self.loop
        p, _ = self.engine.predict(loop.seq, act, base - 1, base, 1)
        x = sample_first_slot(loop.arrays, loop.rng, p)
        if loop.arrays.on_device:             # float32 like the buffer (a torch index_put does not cast)
            x = x.float()
        entropy, = round_results(loop.arrays, (self.engine,), p.entropy)
        return Verdict(None, 0, np.zeros(len(act), np.int64), x, entropy)

    def roll_back(self, act, base, verdict) -> None:
        """Nothing was rejected: every cache holds exactly the accepted tokens."""


class ModelDraft(Proposal):
    """The draft model proposes up to G tokens (fast-ardiff Algorithm 1 lines 9-14: stop at the first token whose
    shallow entropy is below the threshold), by one draft_rollout call where the engines have one of this G, else
    by draft_step calls; the target verifies them in one call and the host accepts (or the target_jacobi engine
    verifies and accepts in the same call: `accept_engine`)."""

    def __init__(self, loop: TokenLoop, gamma: int, rollout=None, accept_engine=None):
        super().__init__(loop)
        self.G, self.label = gamma, f"{'rollout' if rollout is not None else 'model'}:{gamma}"
        self.rollout, self.accept_engine = rollout, accept_engine
        self.seq_windows = loop.arrays.windows(loop.seq, gamma)   # [B, P - G + 1, G, D]: positions p .. p+G-1

    def propose(self, act, na, base) -> Drafts:
        loop = self.loop
        G, draft = self.G, loop.draft
        max_drafts = np.minimum(G, loop.total - 1 - na)      # never past the end
        if self.rollout is not None:                          # one engine call drafts every token of the round
            noise = loop.arrays.normal(loop.rng, (len(act), G, loop.D))
            out = draft.rollout(self.rollout, G, loop.seq, act, base, noise, loop.stopper.threshold32(act),
                                max_drafts)
            self.seq_windows[act, base] = out.drafts          # drafts past k[r] are junk, overwritten later
            # k on the device loop: read back with the round's results
            return Drafts(out.num_drafts, out.drafts, out.draft_mean, out.draft_sigma, None, max_drafts)
        k, q_mean, q_sigma, q_offset = draft_with_steps(draft, loop.stopper, loop.seq, act, base, max_drafts, G,
                                                        loop.rng, loop.stats)
        return Drafts(k, self.seq_windows[act, base], q_mean, q_sigma, q_offset, max_drafts)

    def verify(self, act, base, d: Drafts) -> Verdict:
        loop = self.loop
        target, arrays = loop.target, loop.arrays
        if self.accept_engine is not None and (kmax := int(d.max_drafts.max())):
            # fed every row's max_drafts slots: no draft count needed on the host before the call
            accepted, k, next_token, entropy = jacobi.accept_drafts_in_engine(
                target, self.accept_engine, loop.seq, act, base, d.k, kmax, d.q_mean, d.q_sigma, loop.rng,
                (loop.draft,), loop.caps.accelerator)
        elif arrays.on_device:        # the last token of every row: no drafts, a plain target step (the draws
            R = len(act)              # accept_drafts makes for none)
            kmax, k, accepted = 0, np.zeros(R, np.int64), np.zeros(R, np.int64)
            p, _ = target.predict(loop.seq, act, base - 1, base, 1)
            next_token = sample_first_slot(arrays, loop.rng, p).float()
            entropy, = round_results(arrays, (target, loop.draft), p.entropy)
        else:
            k = np.asarray(d.k).astype(np.int64) if self.rollout is not None else d.k
            kmax = int(k.max())
            p, _ = target.predict(loop.seq, act, base - 1, base + k, kmax + 1)
            q = TokenDistribution(d.q_mean[:, :kmax].astype(np.float64), d.q_sigma[:, :kmax].astype(np.float64),
                                  None, None if d.q_offset is None else d.q_offset[:, :kmax])
            accepted, next_token = accept_drafts(loop.rng, d.tokens[:, :kmax], k, p, q, loop.gen.inner_temperature)
            entropy = p.entropy
        if self.rollout is not None:
            loop.stats.early_stops += int(np.count_nonzero(k < d.max_drafts))
        return Verdict(k, kmax, accepted, next_token, entropy)

    def enter(self, act: np.ndarray) -> None:
        """After rounds of a target-only kind the draft's cache lags the accepted tokens: feed it what it missed,
        in draft_step calls of at most G + 1 positions (what a round's first draft step feeds at most: inside
        every export's profile), so its first draft of the next round reads the exact prefix."""
        loop = self.loop
        draft, chunk = loop.draft, self.G + 1
        end = loop.nc + loop.n[act] - 1                     # the last accepted token is fed by the round itself
        while True:
            lengths = draft.cache.lengths[act]
            behind = np.flatnonzero(lengths < end)
            if not behind.size:
                return
            rows = act[behind]
            upto = np.minimum(end[behind], lengths[behind] + chunk)
            draft.predict(loop.seq, rows, upto - 1, upto, 1)


class Jacobi(Proposal):
    """The target proposes its own next window (`--draft jacobi`, runtime/jacobi.py): each row keeps L guesses
    after its accepted prefix with the Gaussian q each was drawn from; a round verifies them in one call
    (target_jacobi in-graph where the engines have it, else target_verify and the host's resolve_slots), emits
    the accepted prefix plus one token, and the verify's p at the later slots proposes the next window (coupled
    with the old guesses), the calibrated prior past the verified span."""

    def __init__(self, loop: TokenLoop, window: int, engine=None, prior=None):
        super().__init__(loop)
        L, B, D, total, arrays = window, loop.B, loop.D, loop.total, loop.arrays
        self.G, self.label = L, f"jacobi:{L}"
        self.engine, self.prior = engine, prior
        self.guess_mean = arrays.zeros((B, total + L + 1, D))      # q of the guess at token index j, column j
        self.guess_sigma = arrays.ones((B, total + L + 1) + ((D,) if loop.target.rule.diagonal else ()))  # diagonal
        self.have = np.zeros(B, np.int64)                    # guesses in each window (none before the first round)
        self.seq_windows, self.out_windows = arrays.windows(loop.seq, L), arrays.windows(loop.seq, L + 1)
        self.mean_windows, self.sigma_windows = arrays.windows(self.guess_mean, L), arrays.windows(self.guess_sigma, L)
        self.coupling = np.array([1.0 if loop.gen.coupling else 0.0], np.float32)
        # the first window, every guess from the prior (n_cond 1: the feed is then [condition slot, guesses])
        if prior is not None and loop.nc == 1 and not loop.n.any():
            self.from_prior(np.arange(B), np.zeros(B, np.int64), np.full(B, -1))
            self.have[:] = L

    def enter(self, act: np.ndarray) -> None:
        """Guesses left from an earlier stretch of Jacobi rounds were drawn before the tokens emitted since: they
        are dropped. The new window comes from the prior where there is one (else the first round is a plain
        target step whose p proposes the next window)."""
        loop = self.loop
        self.have[act] = 0
        if self.prior is not None:
            self.from_prior(act, loop.n[act], loop.n[act] - 1)
            self.have[act] = self.G

    def from_prior(self, act, first, verified) -> None:
        """The guesses of rows `act` for tokens first[r] .. first[r] + L - 1 past verified[r] from the prior."""
        loop = self.loop
        jacobi.propose_from_prior(loop.arrays, loop.rng, self.prior, loop.seq, self.guess_mean, self.guess_sigma, act,
                                  first, verified, loop.total, loop.nc, self.G)

    def propose(self, act, na, base) -> Drafts:
        loop = self.loop
        # guesses verified (0: a plain target step); the widest feed must fit every row's cache (rows near the end
        # beside rows with room: fewer guesses tested, never a feed shifted back over cached positions)
        k = np.minimum(self.have[act], np.minimum(loop.total - 1 - na, loop.target.cache.capacity - int(base.max())))
        kmax = int(k.max())
        return Drafts(k, None, self.mean_windows[act, na][:, :kmax], self.sigma_windows[act, na][:, :kmax], None, k)

    def verify(self, act, base, d: Drafts) -> Verdict:
        loop = self.loop
        arrays, target, rng, L, D = loop.arrays, loop.target, loop.rng, self.G, loop.D
        k, q_mean, q_sigma = d.k, d.q_mean, d.q_sigma
        kmax = int(k.max())
        if self.engine is not None and kmax:
            R, C = len(act), jacobi.residual_proposals(len(act), loop.caps.accelerator)
            # the feed's own arrays, refilled every round (arrays.kept: the engine's bindings stay)
            q_mean, q_sigma = arrays.kept_copy("q_mean", q_mean), arrays.kept_copy("q_sigma", q_sigma)
            sampling = (q_mean, q_sigma, arrays.kept_copy("k", k), arrays.uniform(rng, (R, kmax), "coins"),
                        arrays.normal(rng, (R, L + 1, D), kept="noise"),
                        arrays.normal(rng, (R, L + 1, C, D), kept="residual_noise"),
                        arrays.uniform(rng, (R, L + 1, C), "residual_coins"))
            res = target.jacobi(self.engine, loop.seq, act, base + k, sampling, self.coupling)
            accepted, miss, entropy = round_results(arrays, (target,), res.accepted, res.residual_miss,
                                                    res.slot_entropy)
            accepted, out = accepted.astype(np.int64), res.tokens_out
            next_mean, next_sigma = res.slot_mean[:, 1:], res.slot_sigma[:, 1:]
            if miss.any():
                r, c = np.nonzero(miss)
                out = jacobi.finish_residuals(rng, arrays, out, res, r, c, accepted, q_mean, q_sigma)
        else:
            p, _ = target.predict(loop.seq, act, base - 1, base + k, kmax + 1)
            guesses = self.seq_windows[act, base][:, :kmax]   # copies (fancy index): the window is rewritten below
            if arrays.on_device:                          # a round without in-graph sampling runs on the host
                *p_host, guesses, q_mean, q_sigma = round_results(arrays, (target,), p.mean, p.sigma, p.entropy,
                                                                  guesses, q_mean, q_sigma)
                p = TokenDistribution(*p_host)
            accepted, out, next_mean, next_sigma = jacobi.resolve_slots(rng, guesses, k, p,
                                                                 TokenDistribution(q_mean, q_sigma, None), L,
                                                                 loop.gen.coupling)
            entropy = p.entropy
            if arrays.on_device:
                out, next_mean, next_sigma = (arrays.to_device(np.asarray(a, np.float32))
                                              for a in (out, next_mean, next_sigma))
        return Verdict(k, kmax, accepted, (out, next_mean, next_sigma), entropy)

    def accept(self, act, na, base, d, verdict: Verdict) -> None:
        """The emitted token, then the next window's guesses with their q."""
        loop = self.loop
        out, next_mean, next_sigma = verdict.next_token
        accepted, L = verdict.accepted, self.G
        self.out_windows[act, base + accepted] = out
        loop.entropy_windows[act, na, :verdict.kmax + 1] = verdict.entropy   # slots past `accepted`: rewritten later
        first = na + accepted + 1
        self.mean_windows[act, first], self.sigma_windows[act, first] = next_mean, next_sigma
        if self.prior is not None:       # the new window's positions past the verified span: from the prior
            self.from_prior(act, first, na + verdict.k)
        loop.n[act] = first
        self.have[act] = L

    def roll_back(self, act, base, verdict: Verdict) -> None:
        loop = self.loop
        loop.target.rollback(act, base + verdict.accepted)     # = n_cond + n - 1: the new token is not fed yet
        loop.stats.record_round(verdict.k, verdict.accepted)


class ProposalEngines(NamedTuple):
    """What a proposal kind is built with besides the loop (runtime/speculative.py start_loop fills it)."""
    kind: str                       # the registry key
    gamma: int                      # drafts per round (model) / the window (Jacobi)
    rollout: object = None          # model: the draft_rollout engine of this gamma (None: draft_step calls)
    accept_engine: object = None    # model: target_jacobi, verifying and accepting in one call (None: the host)
    jacobi_engine: object = None    # Jacobi: target_jacobi, one in-graph round (None: target_verify + the host)
    prior: tuple | None = None      # Jacobi: (mean [B, N, D], sigma [B, N]) of each row's first-window proposal


# proposal kind -> its object over a TokenLoop; a new kind is one class and one entry here
PROPOSALS = {
    "target": lambda loop, e: SingleModel(loop, "target"),
    "draft": lambda loop, e: SingleModel(loop, "draft"),
    "model": lambda loop, e: ModelDraft(loop, e.gamma, e.rollout, e.accept_engine),
    "jacobi": lambda loop, e: Jacobi(loop, e.gamma, e.jacobi_engine, e.prior),
}


def sample_first_slot(arrays, rng: np.random.Generator, p: TokenDistribution):
    """x ~ p at each row's first slot, wherever `arrays` keeps the loop (sampling.sample_gaussian's draw: the same
    float64 normals from rng on the host path)."""
    mean = p.mean[:, 0]
    return mean + scale_of(p.sigma[:, 0], mean) * arrays.normal(rng, tuple(mean.shape), np.float64)


def draft_with_steps(draft: AREngine, stopper: EarlyStop, seq, act, base, max_drafts, G: int, rng, stats):
    """Drafting with one draft_step call per token (engines without a draft_rollout of this gamma)."""
    R = len(act)
    k = np.zeros(R, np.int64)
    # q's sigma per token [R, G], or per dimension [R, G, D] (a diagonal-Gaussian draft: foreign-gaussian)
    D = seq.shape[-1]
    q_mean, q_sigma = np.zeros((R, G, D)), np.ones((R, G) + ((D,) if draft.rule.diagonal else ()))
    q_offset = None                                    # [R, G] once a draft has a log_offset (diffusion heads)
    drafting = max_drafts > 0
    for i in range(G):
        idx = np.flatnonzero(drafting)
        if not idx.size:
            break
        every = len(idx) == R
        rows = act if every else act[idx]
        end = (base if every else base[idx]) + i
        q, shallow = draft.predict(seq, rows, end - 1, end, 1)
        if q.log_offset is not None and q_offset is None:
            q_offset = np.zeros((R, G))
        stop = stopper.should_stop(rows, shallow[:, 0])
        if stop.any():
            keep, go = idx[~stop], ~stop
            seq[act[keep], base[keep] + i] = sample_gaussian(rng, q.mean[go, 0], q.sigma[go, 0])
            drafting[idx[stop]] = False
            stats.early_stops += int(stop.sum())
        else:
            keep, go = (slice(None), slice(None)) if every else (idx, slice(None))
            seq[rows, end] = sample_gaussian(rng, q.mean[:, 0], q.sigma[:, 0])
        q_mean[keep, i], q_sigma[keep, i] = q.mean[go, 0], q.sigma[go, 0]
        if q_offset is not None:
            q_offset[keep, i] = q.log_offset[go, 0]
        k[keep] += 1
        drafting &= k < max_drafts
    return k, q_mean, q_sigma, q_offset
