"""Token movement between the router and the experts, in megatron-core's dispatcher phases.

A dispatcher moves a rank's routed tokens to the ranks holding their experts and brings the experts'
outputs back, in six phases around the expert computation, which the layer runs itself::

    state = dispatcher.dispatch_preprocess(x, routing)     # plan; split sizes exchanged (the one host read)
    state = dispatcher.token_dispatch(state)               # rows start travelling (asynchronous)
    ...                                                    # other work: the shared expert
    expert_input = dispatcher.dispatch_postprocess(state)  # rows arrived; expert-sorted order
    expert_output = experts(expert_input.x, expert_input.tokens_per_expert, gather_index=expert_input.gather_index,
                            probs=expert_input.probs)   # gated rows, in expert order
    state = dispatcher.combine_preprocess(state, expert_output)  # gated rows summed per returning row
    state = dispatcher.token_combine(state)                # rows start back (asynchronous)
    output = dispatcher.combine_postprocess(state)         # each token sums its rows

- :class:`LocalDispatcher`: every expert on this rank; the experts read their rows through ``gather_index``
  (the permutation fused into the grouped GEMM's loads) and scale each row's activation by its gate
  (``probs``, in expert order), so the combine is a plain sum that keeps nothing for the backward.
- :class:`AllToAllDispatcher`: de-duplicated all-to-all over a group; a token crosses to each destination
  once with its assignments there, and the destination hands what it received to an inner dispatcher. With a
  :class:`LocalDispatcher` inside, one level (experts spread over one node's ranks, or over every rank of the
  expert-parallel group: the flat all-to-all); with another :class:`AllToAllDispatcher` inside, two levels:
  across nodes to the rank of the same local index, then inside the node (:func:`build_dispatcher`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from granular_moe.collectives import PendingRows, all_to_all_async, split_tokens, start_all_to_all
from granular_moe.ops import kernels_for
from granular_moe.router import Routing


@dataclass
class ExpertInput:
    """What the experts run on: row ``i`` is ``x[gather_index[i]]`` with gate ``probs[i]``, rows of expert ``e``
    contiguous, ``tokens_per_expert[e]`` of them."""

    x: torch.Tensor
    tokens_per_expert: torch.Tensor
    gather_index: torch.Tensor
    probs: torch.Tensor


class TokenDispatcher(Protocol):
    """megatron-core's dispatcher phases (``MoETokenDispatcher``), with the state of one forward passed along
    instead of kept on the dispatcher."""

    traffic: Optional["AllToAllTraffic"]

    def dispatch_preprocess(self, x: torch.Tensor, routing: Routing) -> Any: ...
    def token_dispatch(self, state: Any) -> Any: ...
    def dispatch_postprocess(self, state: Any) -> ExpertInput: ...
    def combine_preprocess(self, state: Any, expert_output: torch.Tensor) -> Any: ...
    def token_combine(self, state: Any) -> Any: ...
    def combine_postprocess(self, state: Any) -> torch.Tensor: ...


def run_dispatcher(dispatcher: TokenDispatcher, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
    """All six phases around ``experts`` with nothing in between: the layer's output rows for ``x``."""
    state = dispatcher.token_dispatch(dispatcher.dispatch_preprocess(x, routing))
    expert_input = dispatcher.dispatch_postprocess(state)
    expert_output = experts(expert_input.x, expert_input.tokens_per_expert, gather_index=expert_input.gather_index,
                            probs=expert_input.probs)
    state = dispatcher.token_combine(dispatcher.combine_preprocess(state, expert_output))
    return dispatcher.combine_postprocess(state)


@dataclass
class AllToAllTraffic:
    """What one forward dispatch sent from this rank, every level together (the combine returns the same
    rows). ``rows_sent`` counts (row, destination rank) rows, self included; rows and bytes to other ranks of
    this node and to other nodes are counted apart. ``assignments`` is this rank's routed (token, expert)
    assignments: the rows a dispatcher without de-duplication sends. Bytes: token rows, gate weights and
    their metadata (one integer per row, one per assignment)."""

    assignments: int = 0
    rows_sent: int = 0
    intra_node_rows_sent: int = 0
    intra_node_bytes_sent: int = 0
    inter_node_rows_sent: int = 0
    inter_node_bytes_sent: int = 0

    @property
    def remote_rows_sent(self) -> int:
        return self.intra_node_rows_sent + self.inter_node_rows_sent

    @property
    def remote_bytes_sent(self) -> int:
        return self.intra_node_bytes_sent + self.inter_node_bytes_sent

    def as_dict(self) -> dict:
        return asdict(self) | {"remote_rows_sent": self.remote_rows_sent, "remote_bytes_sent": self.remote_bytes_sent}


@dataclass
class _LocalState:
    x: torch.Tensor
    routing: Routing
    plan: Any
    ops: Any
    output: Optional[torch.Tensor] = None


class LocalDispatcher:
    """Every expert lives on this rank: the plan sorts the assignments by expert, the experts gather their
    rows and gate them, and each token sums its rows."""

    traffic = None

    def __init__(self, kernels: str = "auto"):
        self.kernels = kernels

    def dispatch_preprocess(self, x: torch.Tensor, routing: Routing) -> _LocalState:
        ops = kernels_for(self.kernels, x.device)
        plan = ops.dispatch_plan(routing.expert_index, routing.token_offsets, routing.num_experts)
        return _LocalState(x, routing, plan, ops)

    def token_dispatch(self, state: _LocalState) -> _LocalState:
        return state

    def dispatch_postprocess(self, state: _LocalState) -> ExpertInput:
        probs = expert_order(state.routing.weight, state.plan.row_of_assignment)
        return ExpertInput(state.x, state.plan.tokens_per_expert, state.plan.source_token, probs)

    def combine_preprocess(self, state: _LocalState, expert_output: torch.Tensor) -> _LocalState:
        # The rows come gated from the experts: a plain sum per token.
        state.output = state.ops.combine(expert_output, None, state.plan.row_of_assignment,
                                         state.routing.token_offsets)
        return state

    def token_combine(self, state: _LocalState) -> _LocalState:
        return state

    def combine_postprocess(self, state: _LocalState) -> torch.Tensor:
        return state.output

    def __call__(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        return run_dispatcher(self, x, routing, experts)


@dataclass
class _Exchange:
    """One forward's all-to-all state: the plan, split sizes, rows in flight, and the inner dispatcher's
    state."""

    x: torch.Tensor
    routing: Routing
    plan: Any
    ops: Any
    send_rows: list
    recv_rows: list
    send_assignments: list
    recv_assignments: list
    metadata: torch.Tensor
    rows_out: torch.Tensor
    weights_out: torch.Tensor
    in_flight: list = field(default_factory=list)
    inner: Any = None
    returning: Optional[PendingRows] = None


class AllToAllDispatcher:
    """Experts spread over ``group``, ``experts_per_peer`` (consecutive ids) per member; what a member receives
    goes to ``inner``, which sees its experts as ids ``0 .. experts_per_peer - 1``.

    De-duplicated: a token routed to several experts of one member crosses to it once, with their local ids
    and gate weights; the member returns one row per received row (the inner dispatcher's sum of its gated
    outputs), which the source sums per token. Split sizes go first (one small all-to-all, read on the host),
    then metadata, rows and gate weights with exact split sizes, asynchronously. ``peer_nodes[r]``: the node of
    member ``r`` (None: all on this node), for :attr:`traffic`.
    """

    def __init__(self, group: dist.ProcessGroup, experts_per_peer: int, inner: TokenDispatcher,
                 peer_nodes: Optional[Sequence[int]] = None, kernels: str = "auto"):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.experts_per_peer = experts_per_peer
        self.inner = inner
        self.peer_nodes = tuple(peer_nodes) if peer_nodes is not None else (0,) * self.size
        self.kernels = kernels
        self.traffic: Optional[AllToAllTraffic] = None

    def dispatch_preprocess(self, x: torch.Tensor, routing: Routing) -> _Exchange:
        ops = kernels_for(self.kernels, x.device)
        plan = ops.expert_parallel_plan(routing.expert_index, routing.token_offsets, self.experts_per_peer, self.size)
        counts = torch.stack([plan.rows_per_rank, plan.assignments_per_rank], dim=1)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        (send_rows, send_assignments), (recv_rows, recv_assignments) = (
            torch.stack([counts.t(), received_counts.t()]).tolist()  # the split sizes: the one host read
        )
        # Integer metadata in one all-to-all: per destination, its rows' sizes then its local expert ids.
        local_expert = (routing.expert_index % self.experts_per_peer)[plan.send_assignments]
        metadata = torch.cat([
            torch.cat(pair) for pair in zip(plan.send_row_size.split(send_rows), local_expert.split(send_assignments))
        ])
        state = _Exchange(
            x, routing, plan, ops, send_rows, recv_rows, send_assignments, recv_assignments, metadata,
            rows_out=ops.permute(x, plan.send_token), weights_out=routing.weight[plan.send_assignments],
        )
        self.traffic = self._traffic(state)
        return state

    def token_dispatch(self, state: _Exchange) -> _Exchange:
        received_metadata = state.metadata.new_empty(sum(state.recv_rows) + sum(state.recv_assignments))
        state.in_flight = [
            start_all_to_all(
                received_metadata, state.metadata,
                [r + a for r, a in zip(state.recv_rows, state.recv_assignments)],
                [r + a for r, a in zip(state.send_rows, state.send_assignments)], self.group,
            ),
            all_to_all_async(state.rows_out, state.send_rows, state.recv_rows, self.group),
            all_to_all_async(state.weights_out, state.send_assignments, state.recv_assignments, self.group),
        ]
        state.metadata = received_metadata
        return state

    def dispatch_postprocess(self, state: _Exchange) -> ExpertInput:
        metadata_in_flight, rows, weights = state.in_flight
        metadata_in_flight.wait()
        segments = state.metadata.split([n for pair in zip(state.recv_rows, state.recv_assignments) for n in pair])
        received_sizes, received_experts = torch.cat(segments[0::2]), torch.cat(segments[1::2])
        received = Routing(
            expert_index=received_experts,
            weight=weights.result(),
            token_offsets=torch.nn.functional.pad(torch.cumsum(received_sizes, 0), (1, 0)),
            num_experts=self.experts_per_peer,
        )
        state.inner = self.inner.dispatch_preprocess(rows.result(), received)
        state.inner = self.inner.token_dispatch(state.inner)
        if self.inner.traffic is not None:
            self.traffic = _sum_levels(self.traffic, self.inner.traffic)
        return self.inner.dispatch_postprocess(state.inner)

    def combine_preprocess(self, state: _Exchange, expert_output: torch.Tensor) -> _Exchange:
        inner = self.inner.token_combine(self.inner.combine_preprocess(state.inner, expert_output))
        state.inner = self.inner.combine_postprocess(inner)  # one row per received row
        return state

    def token_combine(self, state: _Exchange) -> _Exchange:
        state.returning = all_to_all_async(state.inner, state.recv_rows, state.send_rows, self.group)
        return state

    def combine_postprocess(self, state: _Exchange) -> torch.Tensor:
        returned = state.returning.result()
        # Each token sums the rows it got back (one per member it visited).
        return state.ops.combine(returned, None, state.plan.sent_row_of_pair, state.plan.pair_offsets)

    def __call__(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        return run_dispatcher(self, x, routing, experts)

    def _traffic(self, state: _Exchange) -> AllToAllTraffic:
        """This level's rows and bytes, by where their destination is."""
        traffic = AllToAllTraffic(assignments=sum(state.send_assignments), rows_sent=sum(state.send_rows))
        row_bytes = state.x.shape[1] * state.x.element_size() + state.metadata.element_size()
        assignment_bytes = state.weights_out.element_size() + state.metadata.element_size()
        here = self.peer_nodes[self.rank]
        for peer, (rows, assignments) in enumerate(zip(state.send_rows, state.send_assignments)):
            if peer == self.rank:
                continue
            scope = "intra_node" if self.peer_nodes[peer] == here else "inter_node"
            setattr(traffic, f"{scope}_rows_sent", getattr(traffic, f"{scope}_rows_sent") + rows)
            setattr(traffic, f"{scope}_bytes_sent",
                    getattr(traffic, f"{scope}_bytes_sent") + rows * row_bytes + assignments * assignment_bytes)
        return traffic


def _sum_levels(outer: AllToAllTraffic, inner: AllToAllTraffic) -> AllToAllTraffic:
    """Both levels' rows and bytes; the assignments are the outer level's (this rank's routing)."""
    return AllToAllTraffic(
        assignments=outer.assignments,
        rows_sent=outer.rows_sent + inner.rows_sent,
        intra_node_rows_sent=outer.intra_node_rows_sent + inner.intra_node_rows_sent,
        intra_node_bytes_sent=outer.intra_node_bytes_sent + inner.intra_node_bytes_sent,
        inter_node_rows_sent=outer.inter_node_rows_sent + inner.inter_node_rows_sent,
        inter_node_bytes_sent=outer.inter_node_bytes_sent + inner.inter_node_bytes_sent,
    )


def expert_order(weight: torch.Tensor, row_of_assignment: torch.Tensor) -> torch.Tensor:
    """The gates of token-major assignments in the experts' row order (``probs[row_of_assignment[a]] =
    weight[a]``); the backward keeps only ``row_of_assignment``, which the combine keeps too."""
    return weight.new_empty(weight.shape).index_put_((row_of_assignment,), weight)


def build_dispatcher(groups, num_local_experts: int, kernels: str = "auto", flat: bool = False) -> TokenDispatcher:
    """The dispatcher for this rank's :class:`~granular_moe.parallel.ExpertParallelGroups` (None: one process).

    An expert-parallel group inside one node: one all-to-all level. Spanning nodes: two levels (a token
    crosses to each destination node once, to the rank of this rank's local index, which forwards it inside
    its node), or with ``flat`` one level over the whole group (a row per destination rank, wherever it is).
    """
    local = LocalDispatcher(kernels)
    if groups is None or groups.ep_size == 1:
        return local
    nodes = groups.nodes
    if nodes is None:
        return AllToAllDispatcher(groups.expert_parallel, num_local_experts, local, kernels=kernels)
    if flat:
        peer_nodes = [rank // nodes.ranks_per_node for rank in range(groups.ep_size)]
        return AllToAllDispatcher(groups.expert_parallel, num_local_experts, local, peer_nodes, kernels)
    within_node = AllToAllDispatcher(nodes.intra_node, num_local_experts, local, kernels=kernels)
    return AllToAllDispatcher(nodes.inter_node, num_local_experts * nodes.ranks_per_node, within_node,
                              peer_nodes=range(nodes.nodes), kernels=kernels)


def slice_routing(routing: Routing, start: int, stop: int, group) -> Routing:
    """The routing of tokens ``start:stop`` of a routing replicated over ``group`` (the tensor-parallel ranks
    without sequence parallelism; gate gradients summed back over ``group``)."""
    first, last = routing.token_offsets[start], routing.token_offsets[stop]
    first_index, last_index = int(first), int(last)  # the slice's sizes, read on the host
    return Routing(
        expert_index=routing.expert_index[first_index:last_index],
        weight=split_tokens(routing.weight, first_index, last_index, group),
        token_offsets=routing.token_offsets[start : stop + 1] - first,
        num_experts=routing.num_experts,
    )
