"""The flow stage (speech tokens -> mel): token encoder, CFM Euler solver, and the container that
holds upstream's `flow.pt` and runs upstream's `flow.inference`.

Graphs (pure tensor functions, exportable; see docs/ARCHITECTURE.md):

* `flow_encoder`   - a `TokenEncoder`: `forward(tokens [B,N] int64 (-1 = padding), embedding [B,192])
                     -> mu [B,80,N*ratio], spks [B,80]`. `CV3TokenEncoder` is CosyVoice3's
                     (embedding + pre-lookahead conv + repeat); CosyVoice2's conformer encoder plugs in
                     the same way (subclass `TokenEncoder`, override `encode` if its host-side handling
                     of streaming / look-ahead differs).
* `flow_estimator` - any module called as `estimator(x, mask, mu, t, spks, cond, chunk_frames)`
                     (`models.dit.DiT` for CosyVoice3, the U-Net for CosyVoice2).
* `flow_solver`    - `FlowSolver`: upstream's `CausalConditionalCFM.solve_euler` with classifier-free
                     guidance, the step loop unrolled, as one graph.

`Flow` is the host-side container: state_dict keys are upstream's flow.pt keys (the encoder's
children sit at the top level, the solver is `decoder`, its estimator `decoder.estimator`), so
`load_strict(flow, fold_weight_norm(torch.load("flow.pt")))` works; it also holds upstream's fixed
CFM noise as a non-persistent buffer and implements `inference` like upstream
`CausalMaskedDiffWithDiT.inference` / `CausalMaskedDiffWithXvec.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import fold_weight_norm, load_strict, read_state_dict
from models.dit import DiT, DiTConfig
from models.errors import UserError
from models.layers import PreLookaheadLayer

T_SCHEDULERS = ("cosine", "linear")


def _kwargs(entry) -> dict:
    """config.json entries are `{class, kwargs, ...}`; accept those or bare kwargs."""
    if entry is None:
        return {}
    if isinstance(entry, dict) and isinstance(entry.get("kwargs"), dict):
        return dict(entry["kwargs"])
    return dict(entry)


# ------------------------------------------------------------------------------------------------
# solver


@dataclass(frozen=True)
class SolverConfig:
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"

    def __post_init__(self):
        if self.t_scheduler not in T_SCHEDULERS:
            raise UserError(f"flow t_scheduler {self.t_scheduler!r} is not supported.",
                            f"use one of {list(T_SCHEDULERS)}")
        if self.n_timesteps < 1:
            raise UserError(f"flow n_timesteps = {self.n_timesteps} must be at least 1.", "set n_timesteps >= 1")

    @classmethod
    def from_upstream(cls, cfm_params: dict, n_timesteps: int = 10) -> "SolverConfig":
        """From upstream `cfm_params` (t_scheduler, inference_cfg_rate; the rest is training-only)."""
        return cls(n_timesteps=int(n_timesteps), inference_cfg_rate=float(cfm_params.get("inference_cfg_rate", 0.7)),
                   t_scheduler=str(cfm_params.get("t_scheduler", "cosine")))


def euler_schedule(cfg: SolverConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, dt) of every Euler step, float32 [n] each, computed exactly as upstream's
    `CausalConditionalCFM.forward` + `solve_euler` do: t_span = linspace(0, 1, n+1) (cosine:
    1 - cos(t_span * 0.5 * pi)), t accumulates t + dt, and dt is recomputed as t_span[k+1] - t."""
    n = cfg.n_timesteps
    t_span = torch.linspace(0, 1, n + 1, dtype=torch.float32)
    if cfg.t_scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    t, dt = t_span[0], t_span[1] - t_span[0]
    ts, dts = [], []
    for step in range(1, n + 1):
        ts.append(t)
        dts.append(dt)
        t = t + dt
        if step < n:
            dt = t_span[step + 1] - t
    return torch.stack(ts), torch.stack(dts)


class FlowSolver(nn.Module):
    """Flow-matching ODE solver (fixed-step Euler, classifier-free guidance) as one graph.

    forward(z [B,80,T] initial noise, mask [B,1,T] float, mu [B,80,T], spks [B,80], cond [B,80,T],
            chunk_frames int64 [1]) -> mel [B,80,T] (float32)

    Each step runs the estimator once on the CFG batch [conditional rows..., unconditional rows...]
    (the unconditional half has mu = spks = cond = 0) and uses v = (1 + r) v_cond - r v_uncond.
    The loop is unrolled (n_timesteps is static). `estimator` may be any module with the call
    signature `(x, mask, mu, t, spks, cond, chunk_frames) -> velocity`.

    Mixed precision: the Euler state (`z` and every update) and the t / dt schedule (FP32_PARTS)
    stay float32 when the estimator runs in a lower dtype: ten small updates in bf16 would lose
    most of their bits against the state. The estimator gets t in float32 too and embeds it before
    casting: bf16 rounds t past 0.5 to steps of 0.004, i.e. 4 of the embedding's `1000 t` (on the
    tiny CosyVoice3 DiT in bf16 at t = 0.99: 3.1 % from fp32 with t rounded, 0.6 % without)."""

    FP32_PARTS = ("t_steps", "dt_steps")

    def __init__(self, estimator: nn.Module, cfg: SolverConfig = SolverConfig()):
        super().__init__()
        self.cfg = cfg
        self.estimator = estimator
        t_steps, dt_steps = euler_schedule(cfg)
        self.register_buffer("t_steps", t_steps, persistent=False)
        self.register_buffer("dt_steps", dt_steps, persistent=False)

    def forward(self, z, mask, mu, spks, cond, chunk_frames):
        return solve_euler_cfg(self.estimator, self.cfg, self.t_steps, self.dt_steps, z, mask, mu, spks, cond, chunk_frames)


def solve_euler_cfg(estimate, cfg: SolverConfig, t_steps, dt_steps, z, mask, mu, spks, cond, chunk_frames):
    """The solver's arithmetic, for any `estimate(x, mask, mu, t, spks, cond, chunk_frames) -> v`: the
    estimator module inside the one-graph solver, or an exported estimator graph called once per step
    from the host (the per-step mode the runtime offers for comparison)."""
    B = z.shape[0]
    dtype = spks.dtype
    r = cfg.inference_cfg_rate
    mask_in = torch.cat([mask, mask], dim=0).to(dtype)
    mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0).to(dtype)
    spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
    cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dtype)
    x = z
    for i in range(cfg.n_timesteps):
        x_in = torch.cat([x, x], dim=0).to(dtype)
        t_in = t_steps[i].reshape(1).expand(2 * B)  # float32: see FlowSolver
        v = estimate(x_in, mask_in, mu_in, t_in, spks_in, cond_in, chunk_frames)
        v_cond, v_uncond = v[:B], v[B:]
        v = (1.0 + r) * v_cond - r * v_uncond
        x = x + dt_steps[i] * v
    return x.float()


def solve_euler_cfg_after_prefix(dit, cfg: SolverConfig, t_steps, dt_steps, z, mu, spks, cond, prefixes: list,
                                 chunk_frames: int) -> tuple[torch.Tensor, list]:
    """`solve_euler_cfg` for `n` new frames (z, mu, cond [B, 80, n], all valid) that follow frames
    already solved, given what the estimator kept of those at each Euler step (`prefixes`: one
    `models.dit.DiTPrefix` per step for the CFG batch [conditional rows..., unconditional rows...];
    `DiTPrefix.empty` for the first chunk). Returns the new frames' mel and the prefixes extended by
    them. The Euler states of the earlier frames are not needed: their velocities never depend on
    later frames. Equal to the last `n` frames of `solve_euler_cfg` on every frame so far (the DiT
    estimator only; chunk_frames > 0 and the earlier frames whole chunks, see `dit_forward_after_prefix`)."""
    from models.dit import dit_forward_after_prefix

    B = z.shape[0]
    dtype = spks.dtype
    r = cfg.inference_cfg_rate
    mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0).to(dtype)
    spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
    cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dtype)
    x = z.float()  # the Euler state stays float32 whatever the estimator's dtype (as FlowSolver's)
    extended = []
    for i in range(cfg.n_timesteps):
        x_in = torch.cat([x, x], dim=0).to(dtype)
        t_in = t_steps[i].reshape(1).expand(2 * B)  # float32: see FlowSolver
        v, prefix = dit_forward_after_prefix(dit, x_in, mu_in, t_in, spks_in, cond_in, prefixes[i], chunk_frames)
        extended.append(prefix)
        v = (1.0 + r) * v[:B] - r * v[B:]
        x = x + dt_steps[i] * v
    return x.float(), extended


def solve_euler_cfg_streams(dit, cfg: SolverConfig, t_steps, dt_steps, z, mu, spks, cond, prefixes: list[list],
                            lengths: list[int], chunk_frames: int, forward=None,
                            keep: list[bool] | None = None) -> tuple[torch.Tensor, list[list | None]]:
    """`solve_euler_cfg_after_prefix` for B streams at once, each at its own place: stream b has
    solved `prefixes[b][0].frames` frames before (its `models.dit.DiTPrefix` per Euler step, the
    stream's [conditional, unconditional] rows) and brings `lengths[b]` (>= 1) new frames, the first
    of z, mu, cond [B, 80, N] (padded past them; spks [B, 80]). One estimator call per Euler step for
    every stream (keys padded per row and masked, see `models.dit.dit_forward_rows_into`). Returns the
    new frames' mel [B, 80, N] (row b valid up to lengths[b]) and every stream's prefixes extended
    by its new frames (None for a stream whose `keep[b]` is False: its last chunk). Equal per stream
    to solving it alone.

    `forward`: `models.dit.dit_forward_rows_into` (default) or a backend's form of it. One whose
    `fixed_shapes` is true replays a captured graph per shape (the cudagraph backend): the round is
    then padded to the shapes it asks for (`forward.rows(n)` streams, `forward.size(n)` kept and new
    frames; a padded stream keeps nothing and brings one zero frame), so a few graphs serve every
    round, and what it returns is its static buffers (copied here before its next call).

    The `prefixes` lists are consumed: each step's entries are let go once stacked, so a round holds
    little more than its streams' prefixes at any time (the old and the extended ones would be twice)."""
    from models.dit import DiTPrefix, _check_whole_chunks, dit_forward_rows_into

    forward = forward or dit_forward_rows_into
    fixed = bool(getattr(forward, "fixed_shapes", False))
    B, _, N = z.shape
    keep = [True] * B if keep is None else keep
    starts = [p[0].frames for p in prefixes]
    for s in starts:
        _check_whole_chunks(s, chunk_frames)
    if min(lengths) < 1:
        raise ValueError(f"every stream brings new frames (lengths {lengths})")
    dtype = spks.dtype
    r = cfg.inference_cfg_rate
    P = max(starts)
    lengths = list(lengths)
    if fixed:  # padded streams (empty prefix, one zero frame), kept and new frames to the graph's sizes
        rows, N_in, P = forward.rows(B), forward.size(N), forward.size(P) if P else 0
        pad = lambda a, n: torch.nn.functional.pad(a, (0, n - a.shape[-1])) if a.shape[-1] < n else a  # noqa: E731
        extra = rows - B
        z, mu, cond = (torch.cat([pad(a, N_in), a.new_zeros(extra, 80, N_in)]) for a in (z, mu, cond))
        spks = torch.cat([spks, spks.new_zeros(extra, spks.shape[1])])
        empty = DiTPrefix.empty(dit, 2, z.device, dtype)
        prefixes = prefixes + [[empty] * cfg.n_timesteps for _ in range(extra)]
        starts, lengths, keep = starts + [0] * extra, lengths + [1] * extra, keep + [False] * extra
        B, N = rows, N_in

    def both(v: list[int]) -> torch.Tensor:  # both CFG halves; pinned, so the copy does not wait for the stream
        t = torch.tensor(v + v, dtype=torch.int64)
        return t.pin_memory().to(z.device, non_blocking=True) if z.is_cuda else t

    starts_in, lengths_in = both(starts), both(lengths)
    mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0).to(dtype)
    spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
    cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dtype)
    x = z.float()  # the Euler state stays float32 whatever the estimator's dtype (as FlowSolver's)
    extended: list[list] = [[] for _ in range(B)]
    for i in range(cfg.n_timesteps):
        # every stream's kept frames in one buffer with room for the new ones (the forward writes them
        # there): rows b and B + b are stream b's conditional and unconditional rows
        first = prefixes[0][i]
        L, _, _, _, inner = first.kv.shape
        kv = first.kv.new_empty(L, 2, 2 * B, P + N, inner)
        if min(starts) < P:
            kv[:, :, :, :P].zero_()  # a masked key's value still meets a zero weight: never garbage (NaN)
        conv_in = first.conv_in.new_empty(2 * B, *first.conv_in.shape[1:])
        conv_mid = first.conv_mid.new_empty(2 * B, *first.conv_mid.shape[1:])
        for b, p in enumerate(prefixes):
            kv[:, :, b::B, : starts[b]] = p[i].kv
            conv_in[b::B], conv_mid[b::B] = p[i].conv_in, p[i].conv_mid
            p[i] = None
        x_in = torch.cat([x, x], dim=0).to(dtype)
        t_in = t_steps[i].reshape(1).expand(2 * B)  # float32: see FlowSolver
        v, kv, conv_in, conv_mid = forward(dit, x_in, mu_in, t_in, spks_in, cond_in, kv, conv_in, conv_mid,
                                           starts_in, lengths_in, chunk_frames)
        if not fixed and B == 1 and starts[0] == P and lengths[0] == N:  # nothing padded: the buffer is it
            extended[0].append(DiTPrefix(kv, conv_in, conv_mid) if keep[0] else None)
        else:
            for b in range(B):  # this stream's rows (b and B + b): its earlier frames, then its new ones,
                # copied, so the round's padded buffers go (or the captured graph's are free again)
                if keep[b]:
                    mine = kv[:, :, b::B]
                    extended[b].append(DiTPrefix(torch.cat([mine[:, :, :, : starts[b]], mine[:, :, :, P: P + lengths[b]]],
                                                           dim=3), conv_in[b::B].clone(), conv_mid[b::B].clone()))
        del kv
        v = (1.0 + r) * v[:B] - r * v[B:]
        x = x + dt_steps[i] * v
    real = len(keep) if not fixed else len(keep) - extra
    return x[:real].float(), [e if k else None for e, k in zip(extended[:real], keep[:real])]


# ------------------------------------------------------------------------------------------------
# token encoders


class TokenEncoder(nn.Module):
    """Base of the flow's token encoders (the `flow_encoder` graph).

    Graph: `forward(tokens [B,N] int64, -1 = padding, embedding [B,spk_embed_dim]) -> (mu [B,80,N*ratio],
    spks [B,80])`. Every parameter must live in a child module: `Flow` adopts the children at its top
    level so that state_dict keys match upstream's flow.pt. Subclasses set `token_mel_ratio` and
    `pre_lookahead_len`; `encode` is the host-side call `Flow.inference` makes."""

    # numerically sensitive in fp16 (a rung of the fp16 precision ladder keeps it float32)
    SENSITIVE_PARTS = ("spk_embed_affine_layer",)

    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3

    def encode(self, tokens: torch.Tensor, embedding: torch.Tensor, streaming: bool, finalize: bool):
        """Host side: mu, spks for `tokens` (prompt + new, int64 [1,N]). finalize=False: the last
        pre_lookahead_len tokens are look-ahead context only, so their frames are dropped. The
        default runs the graph on all tokens and drops those frames, which is exact when the
        encoder's look-ahead is bounded by pre_lookahead_len (CosyVoice3); `streaming` is unused."""
        mu, spks = self(tokens, embedding)
        if not finalize:
            mu = mu[:, :, : mu.shape[2] - self.pre_lookahead_len * self.token_mel_ratio]
        return mu, spks


class CV3TokenEncoder(TokenEncoder):
    """CosyVoice3's flow front (`CausalMaskedDiffWithDiT` before the decoder): token embedding
    (padding -> zeros), pre-lookahead conv, repeat each token `token_mel_ratio` times; speaker
    x-vector L2-normalised and projected to 80."""

    def __init__(self, vocab_size: int, input_size: int, output_size: int, spk_embed_dim: int,
                 token_mel_ratio: int, pre_lookahead_len: int, pre_lookahead_channels: int):
        super().__init__()
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(input_size, pre_lookahead_channels, pre_lookahead_len)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor):
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        valid = (tokens >= 0).unsqueeze(-1).to(embedding.dtype)
        h = self.input_embedding(torch.clamp(tokens, min=0)) * valid  # [B,N,C]
        h = self.pre_lookahead_layer(h)
        B, N, C = h.shape
        r = self.token_mel_ratio
        h = h.unsqueeze(2).expand(B, N, r, C).reshape(B, N * r, C)  # = repeat_interleave(r, dim=1)
        return h.transpose(1, 2).contiguous(), spks


# ------------------------------------------------------------------------------------------------
# container


def _config_value(module: nn.Module, name: str, default: int) -> int:
    """`module.<name>`, else `module.cfg.<name>`, else default."""
    if hasattr(module, name):
        return int(getattr(module, name))
    return int(getattr(getattr(module, "cfg", None), name, default))


def _pre_lookahead_len(encoder: nn.Module) -> int:
    return _config_value(encoder, "pre_lookahead_len", 0)


def upstream_noise(channels: int = 80, frames: int = 15000) -> torch.Tensor:
    """Upstream CausalConditionalCFM's fixed noise: `torch.manual_seed(0); torch.randn(1, 80, 15000)`,
    drawn from a local generator so the global RNG is untouched."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(1, channels, frames, generator=gen, device="cpu")


class Flow(nn.Module):
    """Host-side flow stage: token encoder + solver (+ estimator) with upstream's flow.pt keys.

    The encoder's children are registered here at the top level (input_embedding,
    spk_embed_affine_layer, pre_lookahead_layer / encoder, encoder_proj, ...); the encoder itself is
    reachable as `flow.token_encoder` (not a registered submodule, so keys are not duplicated).
    `rand_noise` [1,80,noise_frames] is a non-persistent buffer (upstream's fixed noise).

    `inference` gets mu and spks from `encode_fn(tokens, embedding, streaming, finalize)` if given,
    else from `encoder.encode(...)` (see `TokenEncoder.encode`): host-side code that runs the
    encoder graph and returns mu [1,80,T_total] (look-ahead frames already dropped) and spks [1,80].
    That is where an encoder with other graph inputs (CosyVoice2: chunk / context tokens) adapts."""

    def __init__(self, encoder: nn.Module, decoder: FlowSolver, output_size: int = 80,
                 noise_frames: int = 15000, static_chunk_size: int | None = None, encode_fn=None):
        super().__init__()
        if encode_fn is None and not callable(getattr(encoder, "encode", None)):
            raise ValueError("Flow: pass a TokenEncoder (it has `encode`) or an encode_fn for this encoder")
        self.__dict__["_encode_fn"] = encode_fn
        if any(True for _ in encoder.parameters(recurse=False)) or any(True for _ in encoder.buffers(recurse=False)):
            raise ValueError("Flow: the token encoder must keep all parameters and buffers in child modules")
        for name, child in encoder.named_children():
            if name in ("decoder", "token_encoder"):
                raise ValueError(f"Flow: the token encoder may not have a child named {name!r}")
            self.add_module(name, child)
        self.__dict__["token_encoder"] = encoder  # plain attribute: its children are registered above
        self.decoder = decoder
        self.output_size = output_size
        if static_chunk_size is None:  # the estimator's streaming chunk (frames), upstream 50
            static_chunk_size = _config_value(decoder.estimator, "static_chunk_size", 50)
        self.static_chunk_size = static_chunk_size
        self.register_buffer("rand_noise", upstream_noise(output_size, noise_frames), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.token_encoder.training = mode
        return self

    def load_checkpoint(self, path: str) -> None:
        """Read an upstream flow.pt (weights_only) and load it with strict keys and shapes."""
        load_strict(self, fold_weight_norm(read_state_dict(path)), path)

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool = False, finalize: bool = True) -> torch.Tensor:
        """Upstream `flow.inference` for one utterance.

        token [1,N] and prompt_token [1,P] speech token ids (any int dtype), prompt_feat [1,F,80] the
        prompt mel (time-major, F = ratio*P), embedding [1,192] the raw speaker x-vector.
        streaming: static-chunk attention in the estimator (chunk = static_chunk_size frames).
        finalize=False: the last pre_lookahead_len tokens are look-ahead context only.
        Returns mel [1,80,T_total - F] float32, T_total = ratio*(P+N) (minus ratio*pre_lookahead_len
        when not finalizing)."""
        if token.dim() != 2 or token.shape[0] != 1 or prompt_token.dim() != 2 or prompt_token.shape[0] != 1:
            raise UserError(f"flow inference takes one utterance: token {tuple(token.shape)}, prompt_token "
                            f"{tuple(prompt_token.shape)} must be [1, N] and [1, P].", "call it once per utterance")
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != self.output_size:
            raise UserError(f"flow inference: prompt_feat has shape {tuple(prompt_feat.shape)}, expected "
                            f"[1, frames, {self.output_size}] (time-major).", "pass the prompt mel as [1, T, 80]")
        enc = self.token_encoder
        tokens = torch.cat([prompt_token.long(), token.long()], dim=1).to(self.rand_noise.device)
        lookahead = _pre_lookahead_len(enc)
        if not finalize and tokens.shape[1] <= lookahead:
            raise UserError(f"flow inference with finalize=False needs more than {lookahead} tokens "
                            f"(got {tokens.shape[1]}).", "send more tokens, or finalize")
        encode = self._encode_fn if self._encode_fn is not None else enc.encode
        mu, spks = encode(tokens, embedding.to(self.rand_noise.device), streaming, finalize)
        total = mu.shape[2]
        prompt_frames = prompt_feat.shape[1]
        if prompt_frames > total:
            raise UserError(f"flow inference: the prompt mel has {prompt_frames} frames but the tokens give only "
                            f"{total}.", "pass a prompt mel of token_mel_ratio frames per prompt token")
        if total > self.rand_noise.shape[2]:
            raise UserError(f"flow inference: {total} mel frames exceed the {self.rand_noise.shape[2]} frames of "
                            "fixed noise.", "split the request into shorter pieces")
        cond = torch.zeros(1, total, self.output_size, dtype=mu.dtype, device=mu.device)
        cond[:, :prompt_frames] = prompt_feat.to(cond)
        cond = cond.transpose(1, 2)
        mask = torch.ones(1, 1, total, dtype=mu.dtype, device=mu.device)
        z = self.rand_noise[:, :, :total].to(mu.dtype)
        chunk = torch.tensor([self.static_chunk_size if streaming else 0], dtype=torch.int64, device=mu.device)
        mel = self.decoder(z, mask, mu, spks, cond, chunk)
        return mel[:, :, prompt_frames:].float()


# ------------------------------------------------------------------------------------------------
# CosyVoice3 config and builder


@dataclass(frozen=True)
class FlowConfig:
    """CosyVoice3 flow (CausalMaskedDiffWithDiT) hyper-parameters."""

    vocab_size: int
    input_size: int
    output_size: int
    spk_embed_dim: int
    token_mel_ratio: int
    pre_lookahead_len: int
    pre_lookahead_channels: int
    estimator: DiTConfig
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    noise_frames: int = 15000

    def __post_init__(self):
        e = self.estimator
        if self.output_size != e.mel_dim or e.mu_dim != self.input_size or e.spk_dim != self.output_size:
            raise UserError(f"flow config does not fit together: output_size {self.output_size}, input_size "
                            f"{self.input_size}, estimator mel_dim/mu_dim/spk_dim {e.mel_dim}/{e.mu_dim}/{e.spk_dim}.",
                            "use the model's own config (estimator mel_dim = spk_dim = output_size, mu_dim = input_size)")
        self.solver  # validates t_scheduler / n_timesteps

    @property
    def solver(self) -> SolverConfig:
        return SolverConfig(self.n_timesteps, self.inference_cfg_rate, self.t_scheduler)

    @classmethod
    def from_upstream(cls, config: dict) -> "FlowConfig":
        """From a config.json-style dict: entries 'flow' (CausalMaskedDiffWithDiT kwargs),
        'flow.pre_lookahead_layer', 'flow.decoder' (with cfm_params), 'flow.decoder.estimator'
        (DiT kwargs) and optionally 'inference' (n_timesteps); each entry is `{"kwargs": {...}}` or
        the bare kwargs."""
        if "flow" not in config or "flow.decoder.estimator" not in config:
            raise UserError("flow config lacks the 'flow' or 'flow.decoder.estimator' entry.",
                            "pass the model's config.json (CosyVoice3 token2wav)")
        flow = _kwargs(config["flow"])
        pre = _kwargs(config.get("flow.pre_lookahead_layer"))
        dec = _kwargs(config.get("flow.decoder"))
        inf = _kwargs(config.get("inference"))
        cfm = dict(dec.get("cfm_params") or {})
        try:
            input_size = int(flow["input_size"])
            return cls(
                vocab_size=int(flow["vocab_size"]),
                input_size=input_size,
                output_size=int(flow.get("output_size", 80)),
                spk_embed_dim=int(flow.get("spk_embed_dim", 192)),
                token_mel_ratio=int(flow.get("token_mel_ratio", 2)),
                pre_lookahead_len=int(pre.get("pre_lookahead_len", flow.get("pre_lookahead_len", 3))),
                pre_lookahead_channels=int(pre.get("channels", input_size)),
                estimator=DiTConfig.from_upstream(config["flow.decoder.estimator"]),
                n_timesteps=int(inf.get("n_timesteps", 10)),
                inference_cfg_rate=float(inf.get("inference_cfg_rate", cfm.get("inference_cfg_rate", 0.7))),
                t_scheduler=str(inf.get("t_scheduler", cfm.get("t_scheduler", "cosine"))),
            )
        except KeyError as e:
            raise UserError(f"flow config lacks {e.args[0]!r}.", "pass the model's config.json (CosyVoice3 token2wav)") from None


def build_cosyvoice3_flow(cfg: FlowConfig) -> Flow:
    """CosyVoice3's flow with freshly initialised weights; load flow.pt with `Flow.load_checkpoint`."""
    encoder = CV3TokenEncoder(cfg.vocab_size, cfg.input_size, cfg.output_size, cfg.spk_embed_dim,
                              cfg.token_mel_ratio, cfg.pre_lookahead_len, cfg.pre_lookahead_channels)
    solver = FlowSolver(DiT(cfg.estimator), cfg.solver)
    return Flow(encoder, solver, output_size=cfg.output_size, noise_frames=cfg.noise_frames,
                static_chunk_size=cfg.estimator.static_chunk_size).eval()
