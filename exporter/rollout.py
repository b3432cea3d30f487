"""`draft_rollout_<g>`: the draft network unrolled g times in one graph (the contract: engine_modules.py).

Two ways to unroll, the same function (tested equal, and equal to g draft_step calls):

- **lean** (the reference attention, what the `onnx` and CPU `aoti` targets export): step 0 runs the draft over
  the catch-up window against the cache (one ordinary model call); every later step feeds only the newest draft
  through the layers, its keys/values appended to per-layer key/value tensors that hold [cache, window, drafts
  so far], under an additive mask built once (the cache's per-row lengths; everything fed this call is visible).
  On small graphs an engine call costs by its node count, so a step costs one token's layers and the sampling,
  not a whole model call with its mask and position bookkeeping; the early stop and the outputs are computed
  once after the loop.
- **stepwise** (a fused attention kernel: the TensorRT plugin, the Triton op): step i calls the model on the
  window plus the drafts so far against the untouched cache, so every entropy layer stays one fused op whose
  causal offset is the plugin's T - K.
"""
from __future__ import annotations

import torch
from torch import nn

from fastardiff.recipes.models import ARTransformer
from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy

# added (in float32) to the scores of keys a query may not see: exp() of it underflows to exactly 0 and, unlike
# -inf, 0 * (score + MASKED) is 0, so the entropy's sum p * s needs no second mask
MASKED = -1.0e30


class DraftRollout(nn.Module):
    """`gamma` draft steps in one graph: sampling, guidance and early stop in-graph (engine_modules docstring)."""

    def __init__(self, draft: ARTransformer, gamma: int, sigma: SigmaParams):
        super().__init__()
        self.model = draft
        self.gamma = gamma
        self.sigma = sigma

    def forward(self, tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts, temperature, cfg_scale):
        samples, rows = noise.shape[0], cond.shape[0]
        row = torch.arange(rows, device=cond.device)
        owner = row - samples * (row >= samples).long()                 # cache row -> its sample (R = B or 2B)
        lean = self.model.attention_impl == "reference"
        step = LeanSteps(self.model, tokens, lengths, k_cache, v_cache, cond) if lean else None
        x = tokens
        drafts, means, sigmas, shallows = [], [], [], []
        for i in range(self.gamma):
            if lean:
                mean, entropy, shallow = step.first() if i == 0 else step.next(drafts[-1][owner].unsqueeze(1))
            else:   # the window and the drafts so far, re-fed against the untouched cache
                mean, entropy, shallow, new_k, new_v = self.model(x, lengths, k_cache, v_cache, cond)
                mean, entropy, shallow = mean[:, -1], entropy[:, -1], shallow[:, -1]
            z_cond, z_uncond = mean[:samples], mean[rows - samples:]    # the same rows without guidance
            z = z_uncond + cfg_scale * (z_cond - z_uncond)
            sigma = sigma_from_entropy(entropy[:samples], self.sigma) * temperature
            draft = z + sigma.unsqueeze(-1) * noise[:, i]
            drafts.append(draft)
            means.append(z)
            sigmas.append(sigma)
            shallows.append(shallow[:samples])
            if not lean and i + 1 < self.gamma:
                x = torch.cat([x, draft[owner].unsqueeze(1).to(x.dtype)], dim=1)
        if lean:
            new_k, new_v = step.fed_keys_values()
        shallow = torch.stack(shallows, 1)
        # a sample's drafts end at the first one whose shallow entropy is below its threshold, or at max_drafts
        go_on = (shallow >= threshold.unsqueeze(1)) & (torch.arange(self.gamma, device=noise.device) <
                                                      max_drafts.unsqueeze(1))
        kept = (torch.cumsum((~go_on).long(), 1) == 0).long().sum(1)
        return torch.stack(drafts, 1), torch.stack(means, 1), torch.stack(sigmas, 1), kept, shallow, new_k, new_v


class LeanSteps:
    """The draft fed one token at a time after its window, its keys/values kept in-graph (see the module
    docstring). Semantics are ARTransformer.forward's (recipes/models.py) for a feed of window + drafts."""

    def __init__(self, model: ARTransformer, tokens, lengths, k_cache, v_cache, cond):
        self.model, self.tokens, self.lengths, self.cond = model, tokens, lengths, cond
        self.k_cache, self.v_cache = k_cache, v_cache
        self.window = tokens.shape[1]

    def first(self):
        """The model over the window (one ordinary call); sets up the per-layer keys/values and the mask."""
        m = self.model
        mean, entropy, shallow, new_k, new_v = m(self.tokens, self.lengths, self.k_cache, self.v_cache, self.cond)
        self.keys = [torch.cat([self.k_cache[i], new_k[i]], 2) for i in range(m.num_layers)]    # [R, H, S+K0, Dh]
        self.values = [torch.cat([self.v_cache[i], new_v[i]], 2) for i in range(m.num_layers)]
        capacity = self.k_cache.shape[3]
        cached = torch.arange(capacity, device=self.lengths.device).view(1, capacity) < self.lengths.view(-1, 1)
        seen = torch.zeros_like(new_k[0][:, 0, :, 0], dtype=torch.float32)                    # [R, K0]
        bias = torch.cat([torch.where(cached, 0.0, MASKED).to(torch.float32), seen], 1)
        self.bias = bias.view(bias.shape[0], 1, 1, -1)                                        # [R, 1, 1, S+K0]
        self.zero = seen[:, :1].view(-1, 1, 1, 1)                                            # [R, 1, 1, 1]
        self.fed = 0
        return mean[:, -1], entropy[:, -1], shallow[:, -1]

    def next(self, token):
        """Feed one draft token [R, 1, D] (position lengths + K0 + fed); returns (mean, entropy, shallow) [R, ...]."""
        m, cfg = self.model, self.model.cfg
        position = (self.lengths + (self.window + self.fed)).clamp(max=cfg.seq_len - 1)
        visible = (self.lengths + (self.window + self.fed + 1)).to(torch.float32)           # keys it attends
        self.bias = torch.cat([self.bias, self.zero], 3)
        x = m.token_in(token.to(m.pos_emb.dtype)) + m.pos_emb[position].unsqueeze(1)
        entropy = shallow = None
        for i, block in enumerate(m.blocks):
            wants_entropy = i in (m.entropy_layer, m.shallow_layer)
            a, e = self._attend(block.attn, block.norm1(x), i, visible if wants_entropy else None)
            x = x + a
            x = x + block.mlp(block.norm2(x))
            if i == m.entropy_layer:
                entropy = e
            if i == m.shallow_layer:
                shallow = e
        self.fed += 1
        return m.head(m.norm(x))[:, 0], entropy, shallow

    def _attend(self, attn, x, layer: int, visible):
        """Attention of one query per row over the layer's keys so far plus its own; with `visible` also the
        head-averaged attention entropy normalised by log(visible) (> 1 keys: the window is never empty)."""
        R, _, W = x.shape
        q, k, v = attn.qkv(x).view(R, 3, attn.heads, 1, W // attn.heads).unbind(1)            # [R, H, 1, Dh]
        self.keys[layer] = keys = torch.cat([self.keys[layer], k], 2)
        self.values[layer] = values = torch.cat([self.values[layer], v], 2)
        # in float32 whatever the engine's precision, as the reference entropy attention computes
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5) + self.bias
        if visible is None:
            probs, entropy = torch.softmax(scores, -1), None
        else:
            log_norm = torch.logsumexp(scores, -1, keepdim=True)
            probs = torch.exp(scores - log_norm)
            h = (log_norm - (probs * scores).sum(-1, keepdim=True))[:, :, 0, 0]              # [R, H]
            entropy = h.mean(1) / torch.log(visible)          # float32, as the model's entropy output
        out = torch.matmul(probs, values.float()).to(x.dtype).view(R, 1, W)   # [R, H, 1, Dh] -> [R, 1, H * Dh]
        return attn.proj(out), entropy

    def fed_keys_values(self):
        """Keys/values of every position fed this call (window + drafts), [L, R, H, K0 + fed, Dh]."""
        start = self.k_cache.shape[3]
        return (torch.stack([k[:, :, start:] for k in self.keys]), torch.stack([v[:, :, start:] for v in self.values]))
