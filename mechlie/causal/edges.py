"""Edge-level circuits: exact edge patching, the circuit forward, and edge attribution (EAP, EAP-IG).

**Graph.** Senders (upstream nodes): the embeddings (``blocks.0.hook_resid_pre``: token plus
positional embedding), every attention head and every MLP. Receivers (downstream inputs): every
head's **query** input, every key/value head's **key** and **value** inputs (q, k and v are split;
with grouped-query attention a key/value input belongs to the key/value head, shared by the query
heads of its group), every MLP's input, and the logits (the last block's output, before
``ln_final``). An edge ``u -> d`` exists when ``u`` comes before ``d``: a head reads every node of
earlier blocks, an MLP also the heads of its own block, the logits every node. The residual stream
is the sum of the senders' outputs (plus biases, the same in every run), so an edge carries one
summand of a receiver's input.

A head's output is ``z @ W_O[h]`` (what ``hook_result`` holds) plus ``b_O / n_heads``; where the block normalizes the
attention output before adding it (Gemma's ``ln1_post``), that share is normalized with the block's
own scale of the same forward (``ln1_post.hook_scale``), so the heads' outputs still sum to what
the block adds. An MLP's output is ``hook_mlp_out`` (after any ``ln2_post``).

**Runs and signs.** Clean = the honest prompt, corrupt = the lying prompt (``restore``, as in
:mod:`mechlie.causal.joint_patching`). Effects are normalized over pair means
(:mod:`mechlie.causal.effects`): 0 = the lying run, 1 = the honest run, on the final-position
logit difference ``log p(truth) - log p(lie)``. The two prompts of a pair must have the same number
of tokens (positions are then aligned one to one; :func:`equal_length` finds such pairs).

- :func:`patch_edges`, **exact edge patching**: the lying run with each listed edge's value moved
  to the honest run's (receiver input ``+= out_u(honest) - out_u(lying)``); everything downstream of
  the receiver is recomputed. Each row is one set of edges (one edge per row: single-edge effects).
- :func:`circuit_forward`, **the circuit**: MIB's convention. The prompt is the honest one; a
  **kept** edge carries its sender's value in this same forward, a removed edge the sender's value
  in the lying run: receiver input ``= in_d(lying) + sum over kept u of (out_u(now) - out_u(lying))``.
  All edges kept gives the honest run, none the lying run; the honest side is the one kept.
- :func:`attribute_edges`, **EAP** (Syed et al. 2023): ``(out_u(honest) - out_u(lying)) . dM/d in_d``
  at the lying run, summed over positions; one forward and one backward per pair. **EAP-IG**
  (Hanna et al. 2024, MIB's "EAP-IG-inputs"): the gradient is averaged over ``steps`` runs whose
  *input embeddings* are interpolated from lying to honest (``alpha = k / steps``, k = 1..steps,
  the right Riemann sum), all other activations following.

The hooks use TransformerLens's ``use_split_qkv_input`` and ``use_hook_mlp_in`` (set and restored by
:func:`split_inputs`); attention itself is the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechlie.causal.attribution import answer_metric
from mechlie.core.metrics import logits_from_resid
from mechlie.core.pairs import AnswerSet, ContrastPair, PairError, answer_set, tokenize

__all__ = [
    "EdgeGraph",
    "EdgeRows",
    "EdgeScores",
    "attribute_edges",
    "build_graph",
    "circuit_forward",
    "equal_length",
    "patch_edges",
    "split_inputs",
]

FLAGS = ("use_split_qkv_input", "use_hook_mlp_in")


@contextmanager
def split_inputs(model: HookedTransformer) -> Iterator[None]:
    """Per-head q/k/v inputs and an MLP-input hook; the flags restored in ``finally``. (A head's output
    is computed from ``hook_z`` as ``z @ W_O``: ``use_attn_result`` would do the same, more slowly.)"""
    old = {f: getattr(model.cfg, f) for f in FLAGS}
    try:
        for f in FLAGS:
            setattr(model.cfg, f, True)
        yield
    finally:
        for f, v in old.items():
            setattr(model.cfg, f, v)


# ---------------------------------------------------------------------------------------------
# the graph


@dataclass(frozen=True)
class EdgeGraph:
    """Senders and receivers in topological order. Receiver ``r`` reads senders ``[0, n_upstream[r])``.

    Sender index: embed 0; head ``(l, h)`` is ``1 + l * B + h`` and MLP ``l`` is ``1 + l * B + H``
    (``B = H + 1``, or ``H`` without MLPs). Receivers per block: ``H`` queries, ``KV`` keys, ``KV``
    values, the MLP; the logits last."""

    n_layers: int
    n_heads: int
    n_kv: int
    has_mlp: bool
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    n_upstream: Int[Tensor, " recv"]

    @property
    def block(self) -> int:
        return self.n_heads + int(self.has_mlp)

    @property
    def per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv + int(self.has_mlp)

    @property
    def valid(self) -> Bool[Tensor, "send recv"]:
        return torch.arange(len(self.senders))[:, None] < self.n_upstream[None]

    @property
    def edges(self) -> Int[Tensor, "e 2"]:
        """Every edge as (sender, receiver), in sender-major order."""
        return self.valid.nonzero()

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def head(self, layer: int, head: int) -> int:
        return 1 + layer * self.block + head

    def receiver_block(self, layer: int) -> dict[str, list[int]]:
        """Receiver indices of block ``layer``: ``q``, ``k``, ``v`` (lists) and ``mlp``."""
        b = layer * self.per_layer
        H, KV = self.n_heads, self.n_kv
        out = {"q": list(range(b, b + H)), "k": list(range(b + H, b + H + KV))}
        out["v"] = list(range(b + H + KV, b + H + 2 * KV))
        out["mlp"] = [b + H + 2 * KV] if self.has_mlp else []
        return out

    def edge_name(self, edge: Sequence[int] | Tensor) -> str:
        return f"{self.senders[int(edge[0])]}->{self.receivers[int(edge[1])]}"

    def masks(self, edge_sets: Sequence[Int[Tensor, "_ 2"]]) -> Float[Tensor, "rows send recv"]:
        """One 0/1 mask per row with the listed (sender, receiver) edges set."""
        m = torch.zeros(len(edge_sets), len(self.senders), len(self.receivers))
        for r, es in enumerate(edge_sets):
            es = torch.as_tensor(es, dtype=torch.long).reshape(-1, 2)
            if len(es) and not bool(self.valid[es[:, 0], es[:, 1]].all()):
                raise ValueError("an edge set holds a (sender, receiver) that is not an edge of the graph")
            m[r, es[:, 0], es[:, 1]] = 1.0
        return m


def build_graph(model: HookedTransformer) -> EdgeGraph:
    """The edge graph of ``model`` (read from ``model.cfg``)."""
    c = model.cfg
    if c.parallel_attn_mlp or c.positional_embedding_type == "shortformer":
        raise ValueError("edge patching supports sequential attention/MLP blocks without shortformer embeddings")
    L, H, mlp = c.n_layers, c.n_heads, not c.attn_only
    KV = c.n_key_value_heads if c.n_key_value_heads and not c.ungroup_grouped_query_attention else H
    senders, receivers, ups = ["embed"], [], []
    for layer in range(L):
        first = len(senders)
        senders += [f"L{layer}H{h}" for h in range(H)] + ([f"MLP{layer}"] if mlp else [])
        receivers += [f"L{layer}H{h}.q" for h in range(H)]
        receivers += [f"L{layer}KV{g}.k" for g in range(KV)] + [f"L{layer}KV{g}.v" for g in range(KV)]
        ups += [first] * (H + 2 * KV)
        if mlp:
            receivers.append(f"MLP{layer}")
            ups.append(first + H)
    receivers.append("logits")
    ups.append(len(senders))
    return EdgeGraph(L, H, KV, mlp, tuple(senders), tuple(receivers), torch.tensor(ups))


# ---------------------------------------------------------------------------------------------
# one forward with edge hooks


@dataclass
class _Run:
    """What one hooked forward reads and writes. ``weights`` [rows, send, recv]; ``mode``:

    - ``record``: no change; keeps every sender's output in ``out`` and receiver input in ``inp``.
    - ``patch``: receiver input ``+= sum_u w[u, d] * delta[u]`` (``delta`` fixed, [send, pos, d]).
    - ``circuit``: receiver input ``= base[d] + sum_u w[u, d] * (out_u(now) - ref[u])``.
    """

    graph: EdgeGraph
    mode: Literal["record", "patch", "circuit"]
    weights: Tensor | None = None
    delta: Tensor | None = None  # patch: [send, pos, d]
    ref: Tensor | None = None  # circuit: the lying run's sender outputs [send, pos, d]
    base: Tensor | None = None  # circuit: the lying run's receiver inputs [recv, pos, d]
    buf: Tensor | None = None  # circuit: out_u(now) - ref[u], [rows, send, pos * d]
    out: dict | None = None  # record: sender indices -> [rows, pos, k, d]
    inp: dict | None = None  # record: receiver indices -> [rows, pos, k, d]
    final: Tensor | None = None  # the logits receiver's input as the model used it [rows, pos, d]
    groups: dict = field(default_factory=dict)  # circuit: a block's q receivers -> its q, k and v receivers
    ready: dict = field(default_factory=dict)  # circuit: receiver inputs computed with their group

    def sent(self, idx: Sequence[int], acts: Float[Tensor, "rows pos k d"]) -> None:
        if self.mode == "record":
            self.out[tuple(idx)] = acts
        elif self.mode == "circuit":
            rows, pos, k, d = acts.shape
            if self.buf is None:  # flat [rows, send, pos * d]: a receiver's sum is then one batched matmul
                self.buf = torch.zeros((rows, len(self.ref), pos * d), dtype=acts.dtype, device=acts.device)
            self.buf[:, idx] = (acts.transpose(1, 2) - self.ref[idx]).reshape(rows, k, pos * d)

    def received(self, idx: Sequence[int], acts: Float[Tensor, "rows pos k d"]) -> Tensor:
        if self.mode == "record":  # the tensor the model goes on with, so that gradients reach it
            self.inp[tuple(idx)] = acts
            return acts
        rows, pos, k, d = acts.shape
        U = int(self.graph.n_upstream[idx[0]])
        w = self.weights[:, :U, idx].to(acts).transpose(1, 2)  # [rows, k, U]
        if self.mode == "patch":
            add = (w.reshape(rows * k, U) @ self.delta[:U].reshape(U, pos * d)).reshape(rows, k, pos, d)
            return acts + add.transpose(1, 2)
        if idx[0] not in self.ready:  # the first receiver of a group computes the whole group's inputs
            group = self.groups.get(idx[0], list(idx))
            w = self.weights[:, :U, group].to(acts).transpose(1, 2)
            add = torch.bmm(w, self.buf[:, :U]).reshape(rows, len(group), pos, d)
            new = (self.base[group][None] + add).transpose(1, 2)
            self.ready = {i: new[:, :, j] for j, i in enumerate(group)}
        return torch.stack([self.ready.pop(i) for i in idx], 2)


def _hooks(model: HookedTransformer, run: _Run) -> list:
    """The forward hooks of one :class:`_Run` (hook points named by the model's own modules)."""
    g, H = run.graph, run.graph.n_heads
    post = model.cfg.use_normalization_before_and_after
    hooks = [(model.blocks[0].hook_resid_pre.name, lambda a, hook: run.sent([0], a[:, :, None]))]
    for layer in range(g.n_layers):
        blk, rb, scale = model.blocks[layer], g.receiver_block(layer), {}
        run.groups[rb["q"][0]] = rb["q"] + rb["k"] + rb["v"]  # one shared upstream: one matmul
        for ch in ("q", "k", "v"):
            hooks.append((getattr(blk, f"hook_{ch}_input").name, lambda a, hook, i=rb[ch]: run.received(i, a)))
        if post:  # ln1_post's scale comes after hook_result: the heads are sent at hook_attn_out
            hooks.append((blk.ln1_post.hook_scale.name, lambda a, hook, s=scale: s.update(scale=a)))

        def heads(a, hook, layer=layer, blk=blk, s=scale):
            if post and "z" not in s:
                s["z"] = a
                return
            z = s.pop("z", a)  # [rows, pos, head, d_head]: each head's write is z @ W_O, plus b_O / H
            o = torch.einsum("rphe,hed->rphd", z, blk.attn.W_O) + blk.attn.b_O / H
            if post:  # each head's share of ln1_post(sum of heads)
                o = o / s["scale"][:, :, None] * blk.ln1_post.w
            run.sent([g.head(layer, h) for h in range(H)], o)

        hooks.append((blk.attn.hook_z.name, heads))
        if post:
            hooks.append((blk.hook_attn_out.name, heads))
        if g.has_mlp:
            m = rb["mlp"]
            hooks.append((blk.hook_mlp_in.name, lambda a, hook, i=m: run.received(i, a[:, :, None])[:, :, 0]))
            i = g.head(layer, 0) + H  # the MLP's sender index
            hooks.append((blk.hook_mlp_out.name, lambda a, hook, i=i: run.sent([i], a[:, :, None])))

    def final(a, hook):
        run.final = run.received([len(g.receivers) - 1], a[:, :, None])[:, :, 0]
        return run.final

    hooks.append((model.blocks[g.n_layers - 1].hook_resid_post.name, final))
    return hooks


def _forward(model: HookedTransformer, tokens: Int[Tensor, " pos"], run: _Run, rows: int) -> Tensor:
    """Final-position logits ``[rows, vocab]`` of ``tokens`` (one prompt, ``rows`` copies) under ``run``."""
    with split_inputs(model), model.hooks(fwd_hooks=_hooks(model, run)):
        model(tokens[None].expand(rows, -1).to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
    return logits_from_resid(model, run.final[:, -1])


def _record(model: HookedTransformer, tokens: Tensor, graph: EdgeGraph) -> _Run:
    run = _Run(graph, "record", out={}, inp={})
    run.logits = _forward(model, tokens, run, 1)  # type: ignore[attr-defined]
    return run


def _stack(d: dict, n: int, row: int = 0) -> Float[Tensor, "n pos d"]:
    """Recorded blocks ``{indices: [rows, pos, k, d]}`` as one ``[n, pos, d]`` tensor (row ``row``)."""
    out = [None] * n
    for idx, acts in d.items():
        for j, i in enumerate(idx):
            out[i] = acts[row, :, j]
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# public entry points


def equal_length(model: HookedTransformer, pairs: Sequence[ContrastPair]) -> list[int]:
    """Indices of the pairs whose honest and lying prompts have the same number of tokens."""
    return [
        i
        for i, p in enumerate(pairs)
        if len(tokenize(model, [p.honest]).tokens[0]) == len(tokenize(model, [p.lying]).tokens[0])
    ]


@dataclass(frozen=True)
class _PairRuns:
    clean: Tensor  # honest tokens
    corrupt: Tensor
    out_clean: Tensor  # [send, pos, d]
    out_corrupt: Tensor
    in_corrupt: Tensor  # [recv, pos, d]
    metric_clean: float
    metric_corrupt: float


def _pair_runs(model: HookedTransformer, graph: EdgeGraph, pair: ContrastPair, answers: AnswerSet) -> _PairRuns:
    c, x = tokenize(model, [pair.honest]).tokens[0], tokenize(model, [pair.lying]).tokens[0]
    if len(c) != len(x):
        raise PairError(
            f"pair {pair.fact_id!r}: honest ({len(c)}) and lying ({len(x)}) prompts differ in length; "
            "edge patching aligns positions one to one (filter with equal_length)"
        )
    rc, rx = _record(model, c, graph), _record(model, x, graph)
    S, R = len(graph.senders), len(graph.receivers)
    mc = float(answer_metric(rc.logits, answers, "logit_diff"))
    mx = float(answer_metric(rx.logits, answers, "logit_diff"))
    return _PairRuns(c, x, _stack(rc.out, S), _stack(rx.out, S), _stack(rx.inp, R), mc, mx)


def _check_graph(model: HookedTransformer, graph: EdgeGraph) -> None:
    if graph.receivers != build_graph(model).receivers:
        raise ValueError("the edge graph was built for another model")


def _check(model: HookedTransformer, graph: EdgeGraph, weights: Tensor) -> None:
    _check_graph(model, graph)
    S, R = len(graph.senders), len(graph.receivers)
    if weights.ndim != 3 or tuple(weights.shape[1:]) != (S, R):
        raise ValueError(f"edge masks must be [rows, {S}, {R}], got {tuple(weights.shape)}")


@dataclass(frozen=True)
class EdgeRows:
    """Per pair and row, the patched run's logit difference, beside the two unpatched runs'."""

    logit_diff: Float[Tensor, "n rows"]
    clean: Float[Tensor, " n"]  # honest run (effect 1)
    corrupt: Float[Tensor, " n"]  # lying run (effect 0)

    def effect(self, idx: Int[Tensor, " m"] | None = None) -> Float[Tensor, " rows"]:
        """Normalized over pair means (0 = lying run, 1 = honest run)."""
        from mechlie.causal.effects import normalized_mean_effect

        return normalized_mean_effect(self.logit_diff, self.corrupt, self.clean, idx)


@torch.inference_mode()
def _rows(model, graph, pairs, weights, mode: str, max_rows: int) -> EdgeRows:
    _check(model, graph, weights)
    if not pairs:
        raise PairError("no pairs to patch")
    answers = answer_set(model.tokenizer, pairs)
    n, R = len(pairs), len(weights)
    ld, clean, corrupt = torch.empty(n, R), torch.empty(n), torch.empty(n)
    for i, p in enumerate(pairs):
        ans = _answer_rows(answers, i)
        pr = _pair_runs(model, graph, p, ans)
        clean[i], corrupt[i] = pr.metric_clean, pr.metric_corrupt
        for a in range(0, R, max_rows):
            w = weights[a : a + max_rows]
            if mode == "patch":
                run = _Run(graph, "patch", weights=w, delta=pr.out_clean - pr.out_corrupt)
                logits = _forward(model, pr.corrupt, run, len(w))
            else:
                run = _Run(graph, "circuit", weights=w, ref=pr.out_corrupt, base=pr.in_corrupt)
                logits = _forward(model, pr.clean, run, len(w))
            ld[i, a : a + len(w)] = answer_metric(logits, _expand(ans, len(w)), "logit_diff").cpu()
    return EdgeRows(ld, clean, corrupt)


def _answer_rows(answers: AnswerSet, i: int) -> AnswerSet:
    return AnswerSet(answers.truth[i : i + 1], answers.lie[i : i + 1], answers.choices[i : i + 1])


def _expand(ans: AnswerSet, rows: int) -> AnswerSet:
    return AnswerSet(ans.truth.expand(rows, -1), ans.lie.expand(rows, -1), ans.choices.expand(rows, -1))


def patch_edges(
    model: HookedTransformer,
    graph: EdgeGraph,
    pairs: Sequence[ContrastPair],
    weights: Float[Tensor, "rows send recv"],
    *,
    max_rows: int = 8,
) -> EdgeRows:
    """Exact edge patching: per pair, the lying run with each row's edges moved to the honest run's
    values (everything downstream recomputed). ``weights`` from :meth:`EdgeGraph.masks`."""
    return _rows(model, graph, pairs, weights, "patch", max_rows)


def circuit_forward(
    model: HookedTransformer,
    graph: EdgeGraph,
    pairs: Sequence[ContrastPair],
    kept: Float[Tensor, "rows send recv"],
    *,
    max_rows: int = 4,
) -> EdgeRows:
    """The circuit of each row's ``kept`` edges on the honest prompt, every other edge at the lying
    run's value (MIB's convention): its effect is the share of the logit difference it restores."""
    return _rows(model, graph, pairs, kept, "circuit", max_rows)


# ---------------------------------------------------------------------------------------------
# attribution: EAP and EAP-IG


@dataclass(frozen=True)
class EdgeScores:
    """Per pair, every edge's estimated restore effect (patched - lying logit difference); 0 off the graph."""

    scores: Float[Tensor, "n send recv"]
    clean: Float[Tensor, " n"]
    corrupt: Float[Tensor, " n"]
    method: str

    def normalized(self, idx: Int[Tensor, " m"] | None = None) -> Float[Tensor, "send recv"]:
        """Mean over the pairs ``idx`` in units of the honest-lying gap of the same pairs."""
        sel = slice(None) if idx is None else idx
        return self.scores[sel].mean(0) / (self.clean[sel].mean() - self.corrupt[sel].mean())


def _receiver_grads(
    model: HookedTransformer, graph: EdgeGraph, pr: _PairRuns, answers: AnswerSet, steps: int
) -> Float[Tensor, "recv pos d"]:
    """dM/d(receiver input), averaged over ``steps`` runs whose embeddings go from lying to honest
    (``steps = 0``: the lying run alone, plain EAP)."""
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps if steps else torch.zeros(1)
    rows = len(alphas)
    run = _Run(graph, "record", out={}, inp={})
    emb_c, emb_x = pr.out_clean[0], pr.out_corrupt[0]

    def embed(a, hook):
        x = emb_x + alphas.to(a)[:, None, None] * (emb_c - emb_x)
        return x.detach().requires_grad_(True)

    hooks = [(model.blocks[0].hook_resid_pre.name, embed)] + _hooks(model, run)
    with torch.enable_grad(), split_inputs(model), model.hooks(fwd_hooks=hooks):
        model(pr.corrupt[None].expand(rows, -1).to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
        metric = answer_metric(logits_from_resid(model, run.final[:, -1]), _expand(answers, rows), "logit_diff")
        keys = list(run.inp)
        grads = torch.autograd.grad(metric.sum(), [run.inp[k] for k in keys], allow_unused=True)
    mean = {k: torch.zeros_like(run.inp[k][:1]) if g is None else g.mean(0, keepdim=True) for k, g in zip(keys, grads)}
    return _stack(mean, len(graph.receivers))


def attribute_edges(
    model: HookedTransformer,
    graph: EdgeGraph,
    pairs: Sequence[ContrastPair],
    *,
    method: Literal["eap", "eap_ig"] = "eap",
    steps: int = 5,
) -> EdgeScores:
    """Every edge's attribution score per pair: ``(out_u(honest) - out_u(lying)) . grad_d``, summed
    over positions, with ``grad_d`` the lying run's gradient (``eap``) or its mean over ``steps``
    interpolated input embeddings (``eap_ig``)."""
    if method not in ("eap", "eap_ig") or (method == "eap_ig" and steps < 1):
        raise ValueError(f"method must be 'eap' or 'eap_ig' (with steps >= 1), got {method!r}, steps={steps}")
    _check_graph(model, graph)
    if not pairs:
        raise PairError("no pairs to attribute")
    answers = answer_set(model.tokenizer, pairs)
    n, S, R = len(pairs), len(graph.senders), len(graph.receivers)
    out, clean, corrupt = torch.zeros(n, S, R), torch.empty(n), torch.empty(n)
    valid = graph.valid
    for i, p in enumerate(pairs):
        ans = _answer_rows(answers, i)
        with torch.no_grad():
            pr = _pair_runs(model, graph, p, ans)
        grads = _receiver_grads(model, graph, pr, ans, steps if method == "eap_ig" else 0)
        delta = (pr.out_clean - pr.out_corrupt).to(grads)
        out[i] = torch.einsum("spd,rpd->sr", delta, grads).detach().float().cpu() * valid
        clean[i], corrupt[i] = pr.metric_clean, pr.metric_corrupt
    return EdgeScores(out, clean, corrupt, method)
